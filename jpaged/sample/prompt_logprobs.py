"""Prompt logprobs: on the device, each prompt position's log-softmax scored
against the next prompt token; on the host, vLLM's per-position dicts.

A step whose layout asks for them (`StepLayout.prompt_logprobs`) computes the
logits of every token it runs, not only the sampled ones, so a prompt cut
into chunked-prefill steps is scored chunk by chunk. Position ``p`` gives the
logprob of prompt token ``p + 1``; the first prompt token has none (None in
`RequestOutput.prompt_logprobs`). Each dict holds the prompt token with its
rank, then the top ``k`` (ranks 1..k): ``k`` entries when the prompt token is
among them, ``k + 1`` otherwise. Logprobs are those of the raw model
distribution (no temperature or penalties), as for sampled tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpaged.outputs import Logprob


def score_prompt(logits: jax.Array, targets: jax.Array, k: int):
    """``logits [T, V]`` f32 and ``targets [T]`` (-1: none) -> ``(target
    logprob [T], rank [T], top ids [T, k], top logprobs [T, k])``."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.take_along_axis(lp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    rank = jnp.sum(lp > tgt[:, None], axis=-1).astype(jnp.int32) + 1
    vals, ids = jax.lax.top_k(lp, k)
    return tgt, rank, ids.astype(jnp.int32), vals


def position_entries(arrays, span, prompt_ids, k: int, decode) -> list[tuple[int, dict]]:
    """``(prompt index, {token id: Logprob})`` for the positions of one span
    ``(scheduled index, first step token, first position, count)``; index
    ``p + 1`` is scored by position ``p``."""
    tgt, rank, top_ids, top_lps = arrays
    _, a, pos, cnt = span
    out = []
    for j in range(cnt):
        tok = int(prompt_ids[pos + 1 + j])
        entry = {tok: Logprob(float(tgt[a + j]), int(rank[a + j]), decode(tok))}
        for r, (tid, tlp) in enumerate(zip(top_ids[a + j, :k].tolist(),
                                           top_lps[a + j, :k].tolist()), start=1):
            if tid not in entry:
                entry[tid] = Logprob(float(tlp), r, decode(tid))
        out.append((pos + 1 + j, entry))
    return out


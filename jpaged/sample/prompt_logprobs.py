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


# Tokens scored at once: the [chunk, V] logits of one chunk are live at a
# time, so a 2048-token step over a 128k vocabulary never holds [T, V] (1 GiB
# of f32) beyond what the KV budget's profiled step left free.
SCORE_CHUNK = 256


def score_prompt(logits_fn, hidden: jax.Array, targets: jax.Array, k: int):
    """``hidden [T, D]`` -> logits by ``logits_fn`` (f32), scored against
    ``targets [T]`` (-1: none), ``SCORE_CHUNK`` tokens at a time. Returns
    ``(target logprob [T], rank [T], top ids [T, k], top logprobs [T, k])``."""
    t = hidden.shape[0]
    c = min(SCORE_CHUNK, t)
    pad = -t % c
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, c, hidden.shape[1])
    tg = jnp.pad(targets, (0, pad), constant_values=-1).reshape(-1, c)

    def one(args):
        lp = jax.nn.log_softmax(logits_fn(args[0]), axis=-1)
        tgt = jnp.take_along_axis(lp, jnp.maximum(args[1], 0)[:, None], axis=-1)[:, 0]
        rank = jnp.sum(lp > tgt[:, None], axis=-1).astype(jnp.int32) + 1
        vals, ids = jax.lax.top_k(lp, k)
        return tgt, rank, ids.astype(jnp.int32), vals

    outs = jax.lax.map(one, (h, tg))
    return tuple(o.reshape((-1,) + o.shape[2:])[:t] for o in outs)


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


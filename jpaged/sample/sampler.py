"""On-device sampling, vectorised over the rows of a step.

One row per sample to draw (a request's last scheduled token; ``n``
parallel samples of a prompt are ``n`` rows over the same hidden state).
Order of operations, as in vLLM: penalties on the raw logits (repetition
over prompt and output tokens; presence and frequency over output tokens),
``min_tokens`` bans, the logits processors (`logits_processors`), then
greedy rows take the argmax and the others divide by their temperature, apply top-k, top-p and min-p, and draw with the Gumbel
trick from a key that depends only on the row's seed, its sample index and
how many tokens it has generated: a request samples the same tokens alone or
in any batch. Logprobs are those of the raw model distribution, computed only in steps
where some row asked for them.

Optional work (penalties, the sort for top-k/top-p, top logprobs) sits
behind `lax.cond` on runtime flags, so one compiled step serves every mix of
parameters and costs nothing when no row asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jpaged import cpu_kernels
from jpaged.sample.logits_processors import ProcessorContext, apply_processors


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingMetadata:
    temperature: jax.Array  # [S] f32, 0 = greedy
    top_k: jax.Array  # [S] i32, 0 = off
    top_p: jax.Array  # [S] f32, 1 = off
    min_p: jax.Array  # [S] f32, 0 = off
    presence_penalty: jax.Array  # [S] f32
    frequency_penalty: jax.Array  # [S] f32
    repetition_penalty: jax.Array  # [S] f32
    seeds: jax.Array  # [S, 2] u32 (low, high words of the request's seed)
    sample_index: jax.Array  # [S] i32, which of a request's n samples
    output_len: jax.Array  # [S] i32, tokens generated so far
    prompt_len: jax.Array  # [S] i32
    token_rows: jax.Array  # [S] i32, row of the token table holding the request's tokens
    banned: jax.Array  # [S, B] i32 token ids banned this step (min_tokens); V pads
    any_penalty: jax.Array  # [] bool
    any_filter: jax.Array  # [] bool (some row uses top-k, top-p or min-p)
    any_logprobs: jax.Array  # [] bool
    any_random: jax.Array  # [] bool (some row samples; else all greedy, no RNG work)
    any_beam: jax.Array  # [] bool (some row is a beam: return its best next tokens)


def _penalize(logits, md: SamplingMetadata, token_table):
    """Apply repetition, presence and frequency penalties. logits: [S, V]."""
    num_rows, vocab = logits.shape
    toks = token_table[md.token_rows]  # [S, L]
    pos = jnp.arange(toks.shape[1])[None, :]
    total = md.prompt_len + md.output_len
    rows = jnp.arange(num_rows)[:, None]
    is_prompt = pos < md.prompt_len[:, None]
    is_output = (pos >= md.prompt_len[:, None]) & (pos < total[:, None])
    out_counts = jnp.zeros((num_rows, vocab), jnp.int32).at[rows, toks].add(
        is_output.astype(jnp.int32), mode="drop")
    in_prompt = jnp.zeros((num_rows, vocab), jnp.bool_).at[rows, toks].max(
        is_prompt, mode="drop")
    seen = in_prompt | (out_counts > 0)
    rep = md.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - md.frequency_penalty[:, None] * out_counts
    return logits - md.presence_penalty[:, None] * (out_counts > 0)


def _filter(logits, md: SamplingMetadata):
    """Mask tokens outside top-k / top-p / min-p with -inf. logits: [S, V] (tempered)."""
    vocab = logits.shape[-1]
    srt = jnp.sort(logits, axis=-1)[:, ::-1]  # [S, V] descending
    k = jnp.where(md.top_k > 0, jnp.minimum(md.top_k, vocab), vocab)
    kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)  # [S, 1]
    in_top_k = srt >= kth
    srt = jnp.where(in_top_k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    # in_top_k matters here too: rounding can leave cum_before just under 1.
    keep = in_top_k & (cum_before < md.top_p[:, None]) & (
        probs >= md.min_p[:, None] * probs[:, :1])
    keep = keep.at[:, 0].set(True)  # the most likely token always survives
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def argmax_last(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` (first maximum; first NaN if any): on one CPU
    device the native kernel, elsewhere two plain reductions (XLA:CPU runs
    argmax's (value, index) reduction one element at a time: 3.5 ms for
    [32, 49152] floats; two reductions 1.3 ms, the kernel 0.3 ms)."""
    if cpu_kernels.native_argmax_applies(x):
        return cpu_kernels.argmax_rows(x)
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where((x == m) | jnp.isnan(x), iota, x.shape[-1]), axis=-1)


def _row_keys(md: SamplingMetadata):
    def one(seed, idx, n):
        key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
        return jax.random.fold_in(jax.random.fold_in(key, idx), n)

    return jax.vmap(one)(md.seeds, md.sample_index, md.output_len)


def sample(
    logits: jax.Array,  # [S, V] f32 raw model logits
    md: SamplingMetadata,
    token_table: jax.Array,  # [R, max_model_len] i32 per-row token history
    num_logprobs: int,
    processors: tuple = (),
    processor_inputs: tuple = (),
):
    """Returns (tokens [S], sampled logprob [S], rank [S], top ids [S, K], top logprobs [S, K])."""
    num_rows, vocab = logits.shape
    x = jax.lax.cond(md.any_penalty, lambda l: _penalize(l, md, token_table),
                     lambda l: l, logits)
    rows = jnp.arange(num_rows)[:, None]
    x = x.at[rows, md.banned].set(-jnp.inf, mode="drop")
    if processors:
        ctx = ProcessorContext(token_table, md.token_rows, md.prompt_len + md.output_len)
        x = apply_processors(x, processors, processor_inputs, ctx)
    greedy = md.temperature <= 1e-5
    greedy_tokens = argmax_last(x)

    def draw(x):  # only when some row samples
        x = x / jnp.where(greedy, 1.0, md.temperature)[:, None]
        x = jax.lax.cond(md.any_filter, lambda l: _filter(l, md), lambda l: l, x)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(_row_keys(md))
        return argmax_last(x + gumbel)

    sampled = jax.lax.cond(md.any_random, draw, lambda x: greedy_tokens, x)
    tokens = jnp.where(greedy, greedy_tokens, sampled).astype(jnp.int32)

    def with_logprobs(logits):  # only when some row asked for logprobs
        raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
        tok_lp = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
        rank = jnp.sum(raw_logprobs > tok_lp[:, None], axis=-1).astype(jnp.int32) + 1
        vals, ids = jax.lax.top_k(raw_logprobs, num_logprobs)
        return tok_lp, rank, ids.astype(jnp.int32), vals

    def without(logits):
        return (jnp.zeros((num_rows,), jnp.float32), jnp.zeros((num_rows,), jnp.int32),
                jnp.zeros((num_rows, num_logprobs), jnp.int32),
                jnp.zeros((num_rows, num_logprobs), jnp.float32))

    # Three passes over [S, V] a step (a 49k vocabulary on a CPU) that no
    # row needs unless it asked for logprobs.
    tok_lp, rank, top_ids, top_lps = jax.lax.cond(md.any_logprobs, with_logprobs, without,
                                                  logits)
    return tokens, tok_lp, rank, top_ids, top_lps


def beam_candidates(logits, md: SamplingMetadata, token_table, k: int,
                    processors: tuple = (), processor_inputs: tuple = ()):
    """Each row's best ``k`` next tokens for beam search: ``(ids [S, k], logprobs
    [S, k])``, zeros unless some row is a beam. As transformers' beam search,
    the scores are the logprobs (of the logits over the temperature, if any)
    with the penalties, banned ids (-inf) and logits processors applied to them."""
    num_rows = logits.shape[0]

    def run(logits):
        temp = jnp.where(md.temperature <= 1e-5, 1.0, md.temperature)[:, None]
        lp = jax.nn.log_softmax(logits / temp, axis=-1)
        lp = jax.lax.cond(md.any_penalty, lambda l: _penalize(l, md, token_table),
                          lambda l: l, lp)
        lp = lp.at[jnp.arange(num_rows)[:, None], md.banned].set(-jnp.inf, mode="drop")
        if processors:
            ctx = ProcessorContext(token_table, md.token_rows, md.prompt_len + md.output_len)
            lp = apply_processors(lp, processors, processor_inputs, ctx)
        vals, ids = jax.lax.top_k(lp, k)
        return ids.astype(jnp.int32), vals

    def none(logits):
        return jnp.zeros((num_rows, k), jnp.int32), jnp.zeros((num_rows, k), jnp.float32)

    return jax.lax.cond(md.any_beam, run, none, logits)

"""Pure-jnp paged attention: the oracle for every kernel and the CPU backend.

Contract shared by the reference and the Pallas kernels:

* The KV cache of one layer is two arrays ``k_cache, v_cache`` of shape
  ``[num_blocks, block_size, num_kv_heads, head_dim]``. Block 0 is the null
  block; it pads block tables and is never read for a real token.
* A step runs ``T`` flattened query tokens belonging to ``S`` sequences.
  Sequence ``s`` owns tokens ``query_start_loc[s]:query_start_loc[s + 1]`` and
  has ``context_lens[s]`` tokens in the cache *including* this step's tokens
  (they were written before attention runs). Its query tokens are the last
  ``query_len`` positions of its context, so token ``i`` of the sequence sits at
  position ``context_len - query_len + i`` and attends to cache positions
  ``<= `` that one (causal mask offset by ``context_len - query_len``).
* Padding sequences have ``context_lens == 0`` and an empty query range
  (``query_start_loc`` repeats its last value). Padding tokens lie after
  ``query_start_loc[S]``; their outputs are zeros, never NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _deq(x: jax.Array, scale: float) -> jax.Array:
    """A gathered cache tile in float32, times its fp8 scale (1.0: just the cast)."""
    x = x.astype(jnp.float32)
    return x if scale == 1.0 else x * scale


def token_seq_ids(query_start_loc: jax.Array, num_tokens: int) -> jax.Array:
    """Sequence index of each flattened token.

    Args:
      query_start_loc: ``[S + 1]`` int32 cumulative query offsets.
      num_tokens: ``T``, the (padded) number of query tokens.

    Returns:
      ``[T]`` int32; padding tokens get ``S`` (one past the last sequence).
    """
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # searchsorted(side="right") - 1 on starts; tokens past the end map to S.
    return jnp.searchsorted(query_start_loc[1:], t, side="right").astype(jnp.int32)


def token_layout(query_start_loc, context_lens, num_tokens: int):
    """Per token: its sequence (clamped), whether it is real, its sequence's
    context length (0 for padding) and its position. All ``[T]``."""
    num_seqs = context_lens.shape[0]
    seq = token_seq_ids(query_start_loc, num_tokens)
    valid = seq < num_seqs
    seq_c = jnp.minimum(seq, num_seqs - 1)
    ctx = jnp.where(valid, context_lens[seq_c], 0)
    q_len = query_start_loc[seq_c + 1] - query_start_loc[seq_c]
    pos = ctx - q_len + (jnp.arange(num_tokens) - query_start_loc[seq_c])
    return seq_c, valid, ctx, pos


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: jax.Array,  # [S, max_blocks_per_seq] int32
    context_lens: jax.Array,  # [S] int32
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> jax.Array:  # [T, num_heads, head_dim]
    """Attention of ragged query tokens over their sequences' paged KV. The
    cache may be fp8: blocks are upcast and multiplied by ``k_scale``/``v_scale``."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    group = num_heads // num_kv_heads
    max_len = max_blocks * block_size

    seq_c, valid_tok, ctx, pos = token_layout(query_start_loc, context_lens, num_tokens)

    # Gather each token's sequence KV: [T, max_len, kvh, d].
    blocks = block_tables[seq_c]  # [T, max_blocks]
    k = k_cache[blocks].reshape(num_tokens, max_len, num_kv_heads, head_dim)
    v = v_cache[blocks].reshape(num_tokens, max_len, num_kv_heads, head_dim)

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    s = jnp.einsum("tkgd,tlkd->tkgl", qg, _deq(k, k_scale)) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    kv_pos = jnp.arange(max_len)[None, :]  # [1, L]
    mask = (kv_pos <= pos[:, None]) & (kv_pos < ctx[:, None]) & valid_tok[:, None]
    if sliding_window is not None:
        mask &= kv_pos > pos[:, None] - sliding_window
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("tkgl,tlkd->tkgd", p, _deq(v, v_scale))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def paged_decode_attention_reference(
    q: jax.Array,  # [S, num_heads, head_dim], one query token per sequence
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: jax.Array,  # [S, max_blocks_per_seq] int32
    context_lens: jax.Array,  # [S] int32; 0 for padding rows
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> jax.Array:  # [S, num_heads, head_dim]
    """Decode attention: the ragged contract with one token per sequence."""
    # One token per row; padding rows (context 0) are fully masked -> zeros.
    query_start_loc = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return ragged_paged_attention_reference(
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
        scale=scale, soft_cap=soft_cap, sliding_window=sliding_window, k_scale=k_scale,
        v_scale=v_scale)


def online_softmax_update(m, l, acc, s, pv):
    """One chunk of an online softmax: running max ``m`` and sum ``l`` over the
    last axis of the masked scores ``s`` (-inf where masked), and ``acc`` plus
    ``pv(p)``, the chunk's probabilities times its values, all rescaled to the
    new max. Fully masked rows stay at zero, never NaN."""
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    corr = jnp.exp(jnp.where(jnp.isfinite(m), m, 0.0) - m_safe)
    l = l * corr + jnp.sum(p, axis=-1)
    return m_new, l, acc * corr[..., None] + pv(p)


def ragged_paged_attention_chunked(
    q: jax.Array,  # [T, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: jax.Array,  # [S, max_blocks_per_seq] int32
    context_lens: jax.Array,  # [S] int32
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    chunk_tokens: int = 64,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> jax.Array:  # [T, num_heads, head_dim]
    """The reference contract, computed the way a CPU can afford.

    `ragged_paged_attention_reference` materialises every token's whole
    block-table row of K and V (``T x max_len``), which on XLA:CPU costs far
    more than the attention itself. This version walks the context in chunks
    of ``chunk_tokens`` with an online softmax, for a trip count set at run
    time by the longest context in the step, so it reads only what exists and
    holds one chunk at a time. Same contract and results (to float rounding).
    Measured on XLA:CPU (64 decode tokens, GQA 8/2, head_dim 64): 5.6 ms
    against 27 ms over 1024 tokens of context, 0.8 ms against 28 ms over 100;
    64-token chunks beat 128 and 256 (they stay in cache).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    group = num_heads // num_kv_heads
    bpc = max(1, chunk_tokens // block_size)  # blocks per chunk
    chunk = bpc * block_size

    seq_c, _, ctx, pos = token_layout(query_start_loc, context_lens, num_tokens)
    pad = -max_blocks % bpc
    tok_blocks = jnp.pad(block_tables, ((0, 0), (0, pad)))[seq_c]  # [T, max_blocks + pad]
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32) * scale

    def body(i, carry):
        m, l, acc = carry  # [T, kvh, g], [T, kvh, g], [T, kvh, g, D]
        cols = jax.lax.dynamic_slice_in_dim(tok_blocks, i * bpc, bpc, axis=1)  # [T, bpc]
        # Tokens whose context ended read the null block instead: the same
        # cached lines again, rather than other sequences' stale blocks.
        cols = jnp.where(i * chunk < ctx[:, None], cols, 0)
        # [T, chunk, kvh, D] -> [T, kvh, chunk, D]: batch dims leading for the dots.
        k = k_cache[cols].reshape(num_tokens, chunk, num_kv_heads, head_dim)
        v = v_cache[cols].reshape(num_tokens, chunk, num_kv_heads, head_dim)
        k = _deq(jnp.swapaxes(k, 1, 2), k_scale)
        v = _deq(jnp.swapaxes(v, 1, 2), v_scale)
        s = jnp.einsum("tkgd,tkcd->tkgc", qg, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = i * chunk + jnp.arange(chunk)[None, :]  # [1, chunk]
        mask = (kv_pos <= pos[:, None]) & (kv_pos < ctx[:, None])
        if sliding_window is not None:
            mask &= kv_pos > pos[:, None] - sliding_window
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        return online_softmax_update(m, l, acc, s,
                                     lambda p: jnp.einsum("tkgc,tkcd->tkgd", p, v))

    shape = (num_tokens, num_kv_heads, group)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    num_chunks = (jnp.max(ctx) + chunk - 1) // chunk
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)

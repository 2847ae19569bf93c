"""Pure-jnp paged attention: the oracle for every kernel and the CPU backend.

Contract shared by the reference and the Pallas kernels (see DESIGN.md):

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
) -> jax.Array:  # [T, num_heads, head_dim]
    """Attention of ragged query tokens over their sequences' paged KV."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    group = num_heads // num_kv_heads
    max_len = max_blocks * block_size

    seq = token_seq_ids(query_start_loc, num_tokens)  # [T]
    valid_tok = seq < num_seqs
    seq_c = jnp.minimum(seq, num_seqs - 1)
    ctx = jnp.where(valid_tok, context_lens[seq_c], 0)  # [T]
    q_len = query_start_loc[seq_c + 1] - query_start_loc[seq_c]
    pos = ctx - q_len + (jnp.arange(num_tokens) - query_start_loc[seq_c])  # [T]

    # Gather each token's sequence KV: [T, max_len, kvh, d].
    blocks = block_tables[seq_c]  # [T, max_blocks]
    k = k_cache[blocks].reshape(num_tokens, max_len, num_kv_heads, head_dim)
    v = v_cache[blocks].reshape(num_tokens, max_len, num_kv_heads, head_dim)

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    s = jnp.einsum("tkgd,tlkd->tkgl", qg, k.astype(jnp.float32)) * scale
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
    out = jnp.einsum("tkgl,tlkd->tkgd", p, v.astype(jnp.float32))
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
) -> jax.Array:  # [S, num_heads, head_dim]
    """Decode attention: the ragged contract with one token per sequence."""
    # One token per row; padding rows (context 0) are fully masked -> zeros.
    query_start_loc = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return ragged_paged_attention_reference(
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
        scale=scale, soft_cap=soft_cap, sliding_window=sliding_window)

"""Paged attention for the reference backend, tiled by query for prefill.

`ragged_paged_attention_chunked` (the oracle's CPU form) gathers K and V for
every query token: a 512-token prefill chunk reads its sequence's context 512
times and multiplies it one token (a few head rows) at a time. Here the query
tokens of a sequence are cut into tiles of ``q_tile`` tokens; each tile
gathers its sequence's K/V once per context chunk and multiplies
``q_tile x group`` rows at once, with the same online softmax and causal mask
(offset ``context_len - query_len``). Steps in which every sequence has one
query token (pure decode) keep the per-token form, where tiles would only
add padding; `lax.cond` picks at run time, so one compiled step serves both.
Tested against the oracle in tests/test_attention_cpu.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpaged import cpu_kernels
from jpaged.layers.kv_quant import dequantize
from jpaged.pallas_kernels.attention.reference import (online_softmax_update,
                                                      ragged_paged_attention_chunked)


def _prefill_tiles(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, *,
                   scale, sliding_window, q_tile, chunk_tokens, k_scale=1.0, v_scale=1.0):
    """Attention of every sequence with more than one query token, a tile of
    ``q_tile`` of its tokens at a time (a loop with a run-time trip count:
    the step's real tiles only), each tile over the context chunks its
    causal mask reaches. Writes the tiles' rows of ``out`` ([T + q_tile, H, D])."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    group = num_heads // num_kv_heads
    bpc = max(1, chunk_tokens // block_size)
    chunk = bpc * block_size
    rows = q_tile * group
    q_len = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    tiles = jnp.where(q_len > 1, (q_len + q_tile - 1) // q_tile, 0)
    cum = jnp.cumsum(tiles)
    qp = jnp.pad(q, ((0, q_tile), (0, 0), (0, 0)))
    bt = jnp.pad(block_tables, ((0, 0), (0, -max_blocks % bpc + bpc)))
    offs = jnp.arange(q_tile)

    def tile(j, out):
        seq = jnp.searchsorted(cum, j, side="right")
        local = j - (cum[seq] - tiles[seq])
        first = query_start_loc[seq] + local * q_tile
        n_in = jnp.minimum(q_len[seq] - local * q_tile, q_tile)
        ctx = context_lens[seq]
        pos = ctx - q_len[seq] + local * q_tile + offs  # [Q]
        row_pos = jnp.repeat(pos, group)  # [Q * g], rows ordered (token, head in group)
        row_ok = jnp.repeat(offs < n_in, group)
        qt = jax.lax.dynamic_slice_in_dim(qp, first, q_tile)  # [Q, H, D]
        qt = qt.reshape(q_tile, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
        qt = qt.reshape(num_kv_heads, rows, head_dim).astype(jnp.float32) * scale
        blocks = bt[seq]

        def body(i, carry):
            m, l, acc = carry  # [kvh, R], [kvh, R], [kvh, R, D]
            cols = jax.lax.dynamic_slice_in_dim(blocks, i * bpc, bpc)
            k = k_cache[cols].reshape(chunk, num_kv_heads, head_dim).transpose(1, 0, 2)
            v = v_cache[cols].reshape(chunk, num_kv_heads, head_dim).transpose(1, 0, 2)
            s = jnp.einsum("krd,kcd->krc", qt, dequantize(k, k_scale))
            kv_pos = i * chunk + jnp.arange(chunk)
            mask = (kv_pos[None, :] <= row_pos[:, None]) & (kv_pos[None, :] < ctx) \
                & row_ok[:, None]
            if sliding_window is not None:
                mask &= kv_pos[None, :] > row_pos[:, None] - sliding_window
            s = jnp.where(mask[None], s, -jnp.inf)
            return online_softmax_update(
                m, l, acc, s, lambda p: jnp.einsum("krc,kcd->krd", p, dequantize(v, v_scale)))

        shape = (num_kv_heads, rows)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (head_dim,), jnp.float32))
        lo = 0 if sliding_window is None else jnp.maximum(0, pos[0] - sliding_window + 1) // chunk
        hi = (jnp.minimum(pos[n_in - 1] + 1, ctx) + chunk - 1) // chunk  # causal reach
        _, l, acc = jax.lax.fori_loop(lo, hi, body, init)
        res = acc / jnp.where(l == 0, 1.0, l)[..., None]  # [kvh, Q * g, D]
        res = res.reshape(num_kv_heads, q_tile, group, head_dim).transpose(1, 0, 2, 3)
        res = jnp.where((offs < n_in)[:, None, None, None], res, 0.0)
        # Rows past n_in belong to the next tile (written after) or are padding.
        return jax.lax.dynamic_update_slice_in_dim(
            out, res.reshape(q_tile, num_heads, head_dim).astype(out.dtype), first, axis=0)

    return jax.lax.fori_loop(0, cum[-1], tile, out)


def native_applies(q, k_cache, k_scale=1.0, v_scale=1.0) -> bool:
    """Whether the native kernel computes this attention: on XLA:CPU, float32
    or bfloat16 queries and caches of one dtype, head_dim 64 or 128, no fp8
    scales, and not switched off (``JPAGED_CPU_KERNELS=xla``)."""
    if jax.default_backend() != "cpu" or isinstance(k_scale, jax.Array) or isinstance(
            v_scale, jax.Array) or (k_scale, v_scale) != (1.0, 1.0):
        return False
    if q.shape[-1] not in cpu_kernels.HEAD_DIMS:
        if cpu_kernels.mode() == "native":
            raise ValueError(f"JPAGED_CPU_KERNELS=native: head_dim {q.shape[-1]} is not "
                             f"one of {cpu_kernels.HEAD_DIMS}")
        return False
    return cpu_kernels.use_native_attention(q.dtype, k_cache.dtype)


def cpu_paged_attention(
    q: jax.Array,  # [T, num_heads, head_dim]
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: jax.Array,  # [S, max_blocks_per_seq] int32
    context_lens: jax.Array,  # [S] int32
    query_start_loc: jax.Array,  # [S + 1] int32
    *,
    scale: float,
    sliding_window: int | None = None,
    decode_chunk: int = 64,
    q_tile: int = 32,
    chunk_tokens: int = 256,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    native: bool | None = None,
) -> jax.Array:  # [T, num_heads, head_dim]
    """The reference's contract and results on a CPU. By default (``native``
    None) the native kernel of `jpaged.cpu_kernels` where it applies (see
    `native_applies`), else XLA: sequences with one query token (decodes) in
    per-token chunks, the others (prefill chunks) in tiles; a step of decodes
    only skips the tiles altogether. An fp8 cache is dequantized on read with
    ``k_scale``/``v_scale`` (XLA only)."""
    if native is None:
        native = native_applies(q, k_cache, k_scale, v_scale)
    if native:
        return cpu_kernels.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                           query_start_loc, scale=scale,
                                           sliding_window=sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    q_len = query_start_loc[1:] - query_start_loc[:-1]

    def all_decode(q):
        return ragged_paged_attention_chunked(
            q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale=scale,
            sliding_window=sliding_window, chunk_tokens=decode_chunk, k_scale=k_scale,
            v_scale=v_scale)

    def mixed(q):
        return _mixed(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                      q_len, scale=scale, sliding_window=sliding_window,
                      decode_chunk=decode_chunk, q_tile=q_tile, chunk_tokens=chunk_tokens,
                      k_scale=k_scale, v_scale=v_scale)

    return jax.lax.cond(jnp.max(q_len) <= 1, all_decode, mixed, q)


def _mixed(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, q_len, *, scale,
           sliding_window, decode_chunk, q_tile, chunk_tokens, k_scale, v_scale):
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    decode = q_len == 1
    # Decodes: one row per sequence, compacted to [S] (padding rows have context 0).
    first = jnp.minimum(query_start_loc[:-1], num_tokens - 1)
    dec = ragged_paged_attention_chunked(
        q[first], k_cache, v_cache, block_tables, jnp.where(decode, context_lens, 0),
        jnp.arange(num_seqs + 1, dtype=jnp.int32), scale=scale,
        sliding_window=sliding_window, chunk_tokens=decode_chunk, k_scale=k_scale,
        v_scale=v_scale)
    out = jnp.zeros((num_tokens + q_tile, num_heads, head_dim), q.dtype)
    out = _prefill_tiles(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out,
                         scale=scale, sliding_window=sliding_window, q_tile=q_tile,
                         chunk_tokens=chunk_tokens, k_scale=k_scale, v_scale=v_scale)
    out = out.at[jnp.where(decode, first, num_tokens + q_tile)].set(dec, mode="drop")
    return out[:num_tokens]

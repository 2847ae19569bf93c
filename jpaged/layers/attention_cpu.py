"""Prefill attention for the CPU reference backend, in query tiles.

`reference.ragged_paged_attention_chunked` gathers each query token's own
copy of every context chunk, so a prefill chunk of ``T`` tokens over a
context of ``L`` moves ``T x L`` K/V rows: at 100k tokens of context that is
hours on a CPU. Here the step's tokens are cut into tiles of ``q_tile``
consecutive tokens of one sequence (a sequence's query range never shares a
tile with another's); a tile gathers each context chunk of its sequence once
and attends all its queries to it with one matmul, walking only the chunks
its causal range reaches (online softmax). K/V traffic falls by ``q_tile``
and the causal half is skipped. Same contract and results as the reference
(to float rounding); `paged_attention` uses it for steps of many tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Q_TILE = 128  # query tokens per tile
KV_CHUNK = 512  # context tokens per inner step


def num_tiles(num_tokens: int, num_seqs: int, q_tile: int = Q_TILE) -> int:
    """Static bound on the tiles of a step: every sequence may end a tile early."""
    return num_tokens // q_tile + num_seqs


def tiled_prefill_attention(
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
    q_tile: int = Q_TILE,
    kv_chunk: int = KV_CHUNK,
) -> jax.Array:  # [T, num_heads, head_dim]
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs, max_blocks = block_tables.shape
    group = num_heads // num_kv_heads
    bpc = max(1, kv_chunk // block_size)
    chunk = bpc * block_size
    tables = jnp.pad(block_tables, ((0, 0), (0, -max_blocks % bpc)))

    # Tiles: sequence s owns ceil(q_len[s] / q_tile) consecutive tiles.
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    tiles_per_seq = (q_lens + q_tile - 1) // q_tile
    tile_end = jnp.cumsum(tiles_per_seq)
    nt = num_tiles(num_tokens, num_seqs, q_tile)
    tile_ids = jnp.arange(nt, dtype=jnp.int32)
    tile_seq = jnp.searchsorted(tile_end, tile_ids, side="right").astype(jnp.int32)
    tile_valid = tile_seq < num_seqs
    seq = jnp.minimum(tile_seq, num_seqs - 1)
    first = query_start_loc[seq] + (tile_ids - (tile_end[seq] - tiles_per_seq[seq])) * q_tile
    rows = first[:, None] + jnp.arange(q_tile)[None, :]  # [NT, Qt] token indices
    row_valid = tile_valid[:, None] & (rows < query_start_loc[seq + 1][:, None])
    start_pos = context_lens[seq] - q_lens[seq]  # position of the sequence's first query
    pos = start_pos[:, None] + rows - query_start_loc[seq][:, None]  # [NT, Qt]
    last_pos = jnp.max(jnp.where(row_valid, pos, -1), axis=1)  # [NT]
    first_pos = jnp.min(jnp.where(row_valid, pos, jnp.iinfo(jnp.int32).max), axis=1)

    qs = q.astype(jnp.float32) * scale

    def one_tile(args):
        s, r, rv, p, lo, hi = args
        qt = qs[jnp.where(rv, r, 0)].reshape(q_tile, num_kv_heads, group, head_dim)
        qt = jnp.transpose(qt, (1, 2, 0, 3))  # [kvh, g, Qt, D]

        def body(c, carry):
            m, l, acc = carry  # [kvh, g, Qt], [kvh, g, Qt], [kvh, g, Qt, D]
            cols = jax.lax.dynamic_slice_in_dim(tables[s], c * bpc, bpc)  # [bpc]
            k = k_cache[cols].reshape(chunk, num_kv_heads, head_dim)
            v = v_cache[cols].reshape(chunk, num_kv_heads, head_dim)
            k = jnp.transpose(k, (1, 0, 2)).astype(jnp.float32)  # [kvh, chunk, D]
            v = jnp.transpose(v, (1, 0, 2)).astype(jnp.float32)
            sc = jnp.einsum("kgqd,kcd->kgqc", qt, k)
            if soft_cap is not None:
                sc = soft_cap * jnp.tanh(sc / soft_cap)
            kv_pos = c * chunk + jnp.arange(chunk)[None, :]
            mask = (kv_pos <= p[:, None]) & rv[:, None]
            if sliding_window is not None:
                mask &= kv_pos > p[:, None] - sliding_window
            sc = jnp.where(mask[None, None], sc, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            pr = jnp.exp(sc - m_safe[..., None])
            corr = jnp.exp(jnp.where(jnp.isfinite(m), m, 0.0) - m_safe)
            l = l * corr + jnp.sum(pr, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("kgqc,kcd->kgqd", pr, v)
            return m_new, l, acc

        shape = (num_kv_heads, group, q_tile)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (head_dim,), jnp.float32))
        c0 = jnp.int32(0)
        if sliding_window is not None:
            c0 = jnp.maximum(lo - sliding_window + 1, 0) // chunk
        c1 = jnp.where(hi >= 0, hi // chunk + 1, 0)  # invalid tiles: no trips
        _, l, acc = jax.lax.fori_loop(jnp.minimum(c0, c1), c1, body, init)
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]
        return jnp.transpose(out, (2, 0, 1, 3)).reshape(q_tile, num_heads, head_dim)

    outs = jax.lax.map(one_tile, (seq, rows, row_valid, pos, first_pos, last_pos))
    dest = jnp.where(row_valid, rows, num_tokens).reshape(-1)
    out = jnp.zeros((num_tokens, num_heads, head_dim), jnp.float32)
    out = out.at[dest].set(outs.reshape(-1, num_heads, head_dim), mode="drop")
    return out.astype(q.dtype)

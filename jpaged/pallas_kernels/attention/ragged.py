"""Ragged paged attention (chunked prefill and mixed batches) as a Pallas Triton kernel.

The ``T`` flattened query tokens of ``S`` sequences are cut, per sequence,
into query blocks of ``block_q`` tokens. A small jnp prologue lists the
non-empty (sequence, query block) pairs as work items, at most
``min(T, cdiv(T, block_q) + S)`` of them, so that no program is spent on
empty blocks of short sequences. Grid ``(work_items, num_kv_heads)``: one
program takes ``block_q`` tokens times the GQA group of one KV head as the
rows of its tile (``block_q * group_pad >= 16``, so ``tl.dot`` applies) and
runs a flash-attention online softmax over the sequence's pages, read through
the block table straight from the cache layout
``[num_blocks, block_size, num_kv_heads, head_dim]`` as flat ``[keys,
head_dim]`` tiles addressed by page ids loaded one step ahead (so that K and
V stream through Triton's asynchronous copies), stopping at the causal
limit of its last token (mask offset ``context_len - query_len``) and
starting at the sliding window of its first. Padding tokens (after
``query_start_loc[S]``) belong to no work item: the output starts as zeros
(an aliased zero buffer) and only real rows are stored, all with explicit
masks.
An fp8 cache (``float8_e4m3fn``) is read as fp8 tiles, upcast to the
query's dtype in registers; its ``k_scale`` folds into the score scale and
``v_scale`` into the output's normalisation.

Tested in ``tests/test_kernels.py`` (interpret mode on CPU against
``reference.ragged_paged_attention_reference``, and on GPU) and
``tests/test_kernel_lowering.py`` (Triton lowering for an H100, on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpaged.pallas_kernels.attention import common


def _ragged_kernel(
    work_seq_ref,  # [W] int32: sequence of each work item, -1 if none
    work_qblk_ref,  # [W] int32: query block (within the sequence) of each item
    query_start_loc_ref,  # [S + 1] int32
    context_lens_ref,  # [S] int32
    block_tables_ref,  # [S, max_blocks] int32
    q_ref,  # [T, num_heads, head_dim]
    k_ref,  # [num_blocks, block_size, head_dim]: this KV head (strided view)
    v_ref,  # [num_blocks, block_size, head_dim]: this KV head (strided view)
    zeros_ref,  # [T, num_heads, head_dim]: aliased to o_ref, unread
    o_ref,  # [T, num_heads, head_dim]
    *,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    k_scale: float,
    v_scale: float,
    group: int,
    group_pad: int,
    block_q: int,
    pages_per_block: int,
):
  del zeros_ref
  item, kv_head = pl.program_id(0), pl.program_id(1)
  num_tokens, num_heads, head_dim = q_ref.shape
  max_blocks = block_tables_ref.shape[1]
  _, block_size, _ = k_ref.shape
  block_k = pages_per_block * block_size
  rows = block_q * group_pad
  seq = work_seq_ref[item]

  @pl.when(seq >= 0)
  def _():
    qblk = work_qblk_ref[item]
    q_start = query_start_loc_ref[seq]
    q_len = query_start_loc_ref[seq + 1] - q_start
    ctx = context_lens_ref[seq]
    dim = jnp.arange(head_dim, dtype=jnp.int32)  # [head_dim]

    t_off = qblk * block_q + jnp.arange(block_q, dtype=jnp.int32)  # [block_q]
    tok_valid = t_off < q_len
    tok = q_start + t_off
    g = jnp.arange(group_pad, dtype=jnp.int32)  # [group_pad]
    g_valid = g < group
    heads = kv_head * group + g
    valid2 = tok_valid[:, None] & g_valid[None, :]  # [block_q, group_pad]
    mask3 = jnp.broadcast_to(valid2[:, :, None], (block_q, group_pad, head_dim))
    q = common.masked_load(
        q_ref,
        (jnp.where(tok_valid, tok, 0)[:, None, None],
         jnp.where(g_valid, heads, 0)[None, :, None], dim[None, None, :]),
        mask3).reshape(rows, head_dim)

    # Token i of the sequence sits at position ctx - q_len + i.
    q_pos = ctx - q_len + t_off  # [block_q]
    row_pos = jnp.broadcast_to(q_pos[:, None], (block_q, group_pad)).reshape(rows)
    row_valid = valid2.reshape(rows)
    kv_end = ctx - q_len + jnp.minimum(qblk * block_q + block_q, q_len)  # causal limit
    kv_start = jnp.int32(0)
    if sliding_window is not None:
      kv_start = jnp.maximum(ctx - q_len + qblk * block_q - sliding_window + 1, 0)
    start_page = kv_start // block_size
    end_page = (kv_end + block_size - 1) // block_size
    num_iters = (jnp.maximum(end_page - start_page, 0) + pages_per_block - 1) // pages_per_block
    # Flat [block_k] keys and page ids one step ahead, as in the decode kernel:
    # K and V then stream through Triton's asynchronous-copy pipeline.
    key = jnp.arange(block_k, dtype=jnp.int32)
    slot, offset = key // block_size, key % block_size
    slots = jnp.arange(pages_per_block, dtype=jnp.int32)

    def load_ids(i):
      page = start_page + i * pages_per_block + slots
      valid = (page < end_page) & (page < max_blocks)
      return common.masked_load(block_tables_ref, (seq, jnp.where(valid, page, 0)), valid)

    def body(i, carry):
      acc, m_prev, l_prev, ids = carry
      ids_next = load_ids(i + 1)
      page0 = start_page + i * pages_per_block
      kv_pos = (page0 + slot) * block_size + offset  # [block_k]
      kv_valid = (page0 + slot < end_page) & (kv_pos < kv_end) & (kv_pos >= kv_start)
      key_ids = jnp.broadcast_to(ids[:, None], (pages_per_block, block_size)).reshape(block_k)
      kv_idx = (key_ids[:, None], offset[:, None], dim[None, :])
      kv_mask = jnp.broadcast_to(kv_valid[:, None], (block_k, head_dim))
      k = common.masked_load(k_ref, kv_idx, kv_mask)  # [block_k, head_dim]
      v = common.masked_load(v_ref, kv_idx, kv_mask)
      # fp8 cache: upcast here; the scales fold into the score scale and the output.
      k, v = common.upcast_kv(k, q.dtype), common.upcast_kv(v, q.dtype)

      s = common.qk(q, k) * (scale * k_scale)  # [rows, block_k]
      if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
      mask = (row_valid[:, None] & kv_valid[None, :]
              & (kv_pos[None, :] <= row_pos[:, None]))
      if sliding_window is not None:
        mask &= kv_pos[None, :] > row_pos[:, None] - sliding_window
      s = jnp.where(mask, s, -jnp.inf)
      return (*common.online_softmax_step(s, v, acc, m_prev, l_prev), ids_next)

    acc, m, l = common.init_carry(rows, head_dim)
    acc, m, l, _ = lax.fori_loop(0, num_iters, body, (acc, m, l, load_ids(0)))
    del m
    out = acc * (v_scale / jnp.where(l == 0.0, 1.0, l))[:, None]  # [rows, head_dim]
    out = out.reshape(block_q, group_pad, head_dim).astype(o_ref.dtype)
    common.masked_store(  # out-of-bounds indices on masked lanes: dropped
        o_ref,
        (jnp.where(tok_valid, tok, num_tokens)[:, None, None],
         jnp.where(g_valid, heads, num_heads)[None, :, None], dim[None, None, :]),
        out, mask3)


def work_items(query_start_loc: jax.Array, block_q: int, num_items: int):
  """Lists the non-empty (sequence, query block) pairs.

  Args:
    query_start_loc: ``[S + 1]`` int32.
    block_q: query tokens per block.
    num_items: static upper bound ``W`` on the number of pairs.

  Returns:
    ``(work_seq, work_qblk)``, each ``[W]`` int32; unused items have
    ``work_seq == -1``.
  """
  q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
  blocks = (q_lens + block_q - 1) // block_q
  ends = jnp.cumsum(blocks)  # [S]
  w = jnp.arange(num_items, dtype=jnp.int32)
  seq = jnp.searchsorted(ends, w, side="right").astype(jnp.int32)
  valid = w < ends[-1]
  seq_c = jnp.minimum(seq, q_lens.shape[0] - 1)
  qblk = w - (ends[seq_c] - blocks[seq_c])
  return jnp.where(valid, seq_c, -1), jnp.where(valid, qblk, 0).astype(jnp.int32)


def _ragged_call(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                 *, scale, soft_cap, sliding_window, block_q, pages_per_block,
                 num_warps, num_stages, interpret, k_scale=1.0, v_scale=1.0):
  num_tokens, num_heads, head_dim = q.shape
  num_blocks, block_size, num_kv_heads, _ = k_cache.shape
  num_seqs, max_blocks = block_tables.shape
  group = num_heads // num_kv_heads
  group_pad = pl.next_power_of_2(group)
  num_items = min(num_tokens, pl.cdiv(num_tokens, block_q) + num_seqs)
  work_seq, work_qblk = work_items(query_start_loc, block_q, num_items)

  kernel = functools.partial(
      _ragged_kernel, scale=scale, soft_cap=soft_cap, k_scale=k_scale,
      v_scale=v_scale,
      sliding_window=sliding_window, group=group, group_pad=group_pad,
      block_q=block_q, pages_per_block=pages_per_block)

  def full(shape):
    return pl.BlockSpec(shape, lambda w, h: (0,) * len(shape))

  kv_spec = pl.BlockSpec((num_blocks, block_size, None, head_dim),
                         lambda w, h: (0, 0, h, 0))
  return pl.pallas_call(
      kernel,
      grid=(num_items, num_kv_heads),
      in_specs=[
          full((num_items,)), full((num_items,)), full((num_seqs + 1,)),
          full((num_seqs,)), full((num_seqs, max_blocks)), full(q.shape),
          kv_spec, kv_spec, full(q.shape),
      ],
      out_specs=full(q.shape),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      input_output_aliases={8: 0},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"ragged_paged_g{group}_bs{block_size}_q{block_q}_p{pages_per_block}",
  )(work_seq, work_qblk, query_start_loc, context_lens, block_tables, q,
    k_cache, v_cache, jnp.zeros_like(q))


def default_ragged_params(num_heads: int, num_kv_heads: int, head_dim: int,
                          block_size: int, itemsize: int = 2) -> tuple[int, int, int]:
  """Picks ``(block_q, pages_per_compute_block, num_warps)`` from static shapes."""
  group_pad = pl.next_power_of_2(num_heads // num_kv_heads)
  # Tiles sized by bytes so that shared memory stays well under an H100's
  # 227 KiB: q of 32 KiB (128 rows of bf16 x 128), K and V of 16 KiB each,
  # two pipeline stages; the f32 accumulator is at most 128 x 128.
  target_rows = max(16, min(128, (32 * 1024) // (head_dim * itemsize)))
  block_q = max(1, target_rows // group_pad)
  keys = max(16, (16 * 1024) // (head_dim * itemsize))
  pages = max(1, keys // block_size)
  rows = block_q * group_pad
  num_warps = 8 if rows * head_dim >= 128 * 128 else 4
  return block_q, pages, num_warps


@functools.partial(
    jax.jit,
    static_argnames=("scale", "soft_cap", "sliding_window", "k_scale", "v_scale",
                     "block_q",
                     "pages_per_compute_block", "num_warps", "num_stages",
                     "interpret"))
def ragged_paged_attention(
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
    block_q: int | None = None,
    pages_per_compute_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, num_heads, head_dim]
  """Attention of ragged query tokens over their sequences' paged KV.

  Same contract as ``reference.ragged_paged_attention_reference``.

  Args:
    q: ``[T, num_heads, head_dim]`` flattened query tokens (padded).
    k_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    v_cache: same shape and dtype as ``k_cache``.
    block_tables: ``[S, max_blocks_per_seq]`` int32 page ids (0 pads).
    context_lens: ``[S]`` int32 tokens in the cache, this step's included.
    query_start_loc: ``[S + 1]`` int32 cumulative query offsets.
    scale: softmax scale applied to ``q . k``.
    soft_cap: optional logit soft-cap ``cap * tanh(s / cap)``.
    sliding_window: optional window; a query at ``p`` sees ``(p - w, p]``.
    k_scale, v_scale: an fp8 cache's dequantization scales (stored x scale).
    block_q: query tokens per program (power of two); default from shapes,
      about 128 rows (tokens x padded GQA group) for bf16 x 128.
    pages_per_compute_block: pages per inner step (power of two); default
      about 64 keys for bf16 x 128.
    num_warps: Triton warps per program; default from the tile size.
    num_stages: Triton software-pipelining depth; default 3 (two K/V
      tiles buffered), or 2 if those would not fit 160 KiB of shared memory.
    interpret: run the Pallas interpreter (CPU) instead of Triton.

  Returns:
    ``[T, num_heads, head_dim]`` in ``q.dtype``; zeros for padding tokens.
  """
  common.check_paged_args(q, k_cache, v_cache, block_tables, context_lens,
                          soft_cap=soft_cap, sliding_window=sliding_window)
  num_seqs = block_tables.shape[0]
  if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.dtype != jnp.int32:
    raise ValueError(f"query_start_loc must be int32 [{num_seqs + 1}], got "
                     f"{query_start_loc.dtype}{list(query_start_loc.shape)}")
  _, num_heads, head_dim = q.shape
  _, block_size, num_kv_heads, _ = k_cache.shape
  bq, pages, warps = default_ragged_params(num_heads, num_kv_heads, head_dim, block_size,
                                           q.dtype.itemsize)
  bq = block_q if block_q is not None else bq
  pages = pages_per_compute_block if pages_per_compute_block is not None else pages
  warps = num_warps if num_warps is not None else warps
  group_pad = pl.next_power_of_2(num_heads // num_kv_heads)
  if not common.is_power_of_two(bq) or bq * group_pad < 16:
    raise ValueError(f"block_q={bq} must be a power of two with block_q * "
                     f"padded group ({group_pad}) >= 16")
  if not common.is_power_of_two(pages) or pages * block_size < 16:
    raise ValueError(f"pages_per_compute_block={pages} must be a power of two "
                     f"with pages * block_size ({block_size}) >= 16")
  if num_stages is None:
    num_stages = common.default_num_stages(pages * block_size * head_dim * q.dtype.itemsize,
                                           max_stages=3)
  return _ragged_call(
      q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
      scale=float(scale), soft_cap=soft_cap, sliding_window=sliding_window,
      k_scale=float(k_scale), v_scale=float(v_scale), block_q=bq, pages_per_block=pages,
      num_warps=warps,
      num_stages=num_stages, interpret=interpret)

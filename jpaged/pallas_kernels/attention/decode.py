"""Paged decode attention: one query token per sequence, as a Pallas Triton kernel.

Grid ``(num_seqs, num_kv_heads, num_splits)``. One program takes the query
heads of one KV head of one sequence (the GQA group, padded to >= 16 rows so
that ``tl.dot`` applies) and runs an online softmax over its share of the
sequence's pages, ``pages_per_compute_block`` pages per step, gathered through
the block table straight from the cache layout
``[num_blocks, block_size, num_kv_heads, head_dim]`` (no copy, no transpose):
each K/V page is read once per KV head. The page ids of a step load once, one
step ahead, and K and V load as flat ``[keys, head_dim]`` tiles, so that
Triton's pipeliner streams them with asynchronous copies ``num_stages - 1``
tiles deep (a tile reshaped after loading, or addressed by an id loaded in
the same step, defeats that: seen in the sm_90 compile). Split-K divides the *actual* pages of
each sequence evenly among ``num_splits`` programs, so long and short
sequences alike fill the GPU; a small jnp step merges the partial
``(m, l, out)`` with a log-sum-exp. With ``num_splits == 1`` the kernel writes
the final output directly. Every load and store is masked explicitly (no
reliance on edge-block masking, which JAX 0.11 lacks and 0.12 adds).
An fp8 cache (``float8_e4m3fn``) is read as fp8 tiles, upcast to the
query's dtype in registers; its ``k_scale`` folds into the score scale and
``v_scale`` into the output's normalisation.

Tested in ``tests/test_kernels.py`` (interpret mode on CPU against
``reference.paged_decode_attention_reference``, and on GPU) and
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

# Enough programs to give each of an H100's 132 SMs about two.
_TARGET_PROGRAMS = 264
_MAX_SPLITS = 16


def _decode_kernel(
    block_tables_ref,  # [max_blocks] int32: this sequence's row
    context_lens_ref,  # [num_seqs] int32
    q_ref,  # [num_heads, head_dim]: this sequence's query
    k_ref,  # [num_blocks, block_size, head_dim]: this KV head (strided view)
    v_ref,  # [num_blocks, block_size, head_dim]: this KV head (strided view)
    o_ref,  # [num_heads, head_dim]: this (sequence, split); f32 if split
    *stat_refs,  # if split: m_ref, l_ref, each [num_heads] f32
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    k_scale: float,
    v_scale: float,
    group: int,
    group_pad: int,
    pages_per_block: int,
    num_splits: int,
):
  seq, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  max_blocks = block_tables_ref.shape[0]
  num_heads = q_ref.shape[0]
  _, block_size, head_dim = k_ref.shape
  block_k = pages_per_block * block_size
  dim = jnp.arange(head_dim, dtype=jnp.int32)  # [head_dim]

  # Query rows of this KV head's group; rows >= group are padding.
  g = jnp.arange(group_pad, dtype=jnp.int32)  # [group_pad]
  row_valid = g < group
  heads = kv_head * group + g  # [group_pad]
  row_mask = jnp.broadcast_to(row_valid[:, None], (group_pad, head_dim))
  q = common.masked_load(
      q_ref, (jnp.where(row_valid, heads, 0)[:, None], dim[None, :]), row_mask
  )  # [group_pad, head_dim]

  ctx = context_lens_ref[seq]
  first_tok = jnp.int32(0)
  if sliding_window is not None:
    first_tok = jnp.maximum(ctx - sliding_window, 0)
  first_page = first_tok // block_size
  end_page = (ctx + block_size - 1) // block_size
  # This split's share of the sequence's pages (balanced by actual length).
  per_split = (end_page - first_page + num_splits - 1) // num_splits
  start = first_page + split * per_split
  stop = jnp.minimum(start + per_split, end_page)
  num_iters = (jnp.maximum(stop - start, 0) + pages_per_block - 1) // pages_per_block

  # Keys of one tile as a flat [block_k] axis (page slot, offset in page), so
  # that K and V load as plain [block_k, head_dim] tiles: no reshape of the
  # loaded tile, which Triton would route through shared memory again.
  key = jnp.arange(block_k, dtype=jnp.int32)
  slot, offset = key // block_size, key % block_size
  slots = jnp.arange(pages_per_block, dtype=jnp.int32)

  def load_ids(i):
    """Page ids ``[P]`` of iteration ``i``'s pages (one load per block of pages)."""
    page = start + i * pages_per_block + slots
    valid = (page < stop) & (page < max_blocks)
    return common.masked_load(block_tables_ref, (jnp.where(valid, page, 0),), valid)

  def body(i, carry):
    acc, m_prev, l_prev, ids = carry
    # The next block's page ids load now, one iteration ahead of their use, so
    # the K/V loads never wait on a dependent table read.
    ids_next = load_ids(i + 1)
    page0 = start + i * pages_per_block
    pos = (page0 + slot) * block_size + offset  # [block_k]
    kv_valid = (page0 + slot < stop) & (pos < ctx) & (pos >= first_tok)
    key_ids = jnp.broadcast_to(ids[:, None], (pages_per_block, block_size)).reshape(block_k)
    kv_idx = (key_ids[:, None], offset[:, None], dim[None, :])
    kv_mask = jnp.broadcast_to(kv_valid[:, None], (block_k, head_dim))
    k = common.masked_load(k_ref, kv_idx, kv_mask)  # [block_k, head_dim]
    v = common.masked_load(v_ref, kv_idx, kv_mask)
    # fp8 cache: upcast here; the scales fold into the score scale and the output.
    k, v = common.upcast_kv(k, q.dtype), common.upcast_kv(v, q.dtype)

    s = common.qk(q, k) * (scale * k_scale)  # [group_pad, block_k]
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(kv_valid[None, :], s, -jnp.inf)
    return (*common.online_softmax_step(s, v, acc, m_prev, l_prev), ids_next)

  acc, m, l = common.init_carry(group_pad, head_dim)
  acc, m, l, _ = lax.fori_loop(0, num_iters, body, (acc, m, l, load_ids(0)))
  out = acc * (v_scale / jnp.where(l == 0.0, 1.0, l))[:, None]  # [group_pad, head_dim]

  out_heads = jnp.where(row_valid, heads, num_heads)  # out of bounds: dropped
  common.masked_store(o_ref, (out_heads[:, None], dim[None, :]),
                      out.astype(o_ref.dtype), row_mask)
  if stat_refs:
    m_ref, l_ref = stat_refs
    common.masked_store(m_ref, (out_heads,), m, row_valid)
    common.masked_store(l_ref, (out_heads,), l, row_valid)


def _decode_call(q, k_cache, v_cache, block_tables, context_lens, *, scale,
                 soft_cap, sliding_window, pages_per_block, num_splits,
                 num_warps, num_stages, interpret, k_scale=1.0, v_scale=1.0):
  num_seqs, num_heads, head_dim = q.shape
  num_blocks, block_size, num_kv_heads, _ = k_cache.shape
  max_blocks = block_tables.shape[1]
  group = num_heads // num_kv_heads
  group_pad = max(16, pl.next_power_of_2(group))
  split = num_splits > 1

  kernel = functools.partial(
      _decode_kernel, scale=scale, soft_cap=soft_cap, k_scale=k_scale, v_scale=v_scale,
      sliding_window=sliding_window, group=group, group_pad=group_pad,
      pages_per_block=pages_per_block, num_splits=num_splits)
  kv_spec = pl.BlockSpec((num_blocks, block_size, None, head_dim),
                         lambda s, h, k: (0, 0, h, 0))
  in_specs = [
      pl.BlockSpec((None, max_blocks), lambda s, h, k: (s, 0)),  # block_tables
      pl.BlockSpec((num_seqs,), lambda s, h, k: (0,)),  # context_lens
      pl.BlockSpec((None, num_heads, head_dim), lambda s, h, k: (s, 0, 0)),  # q
      kv_spec, kv_spec,
  ]
  if split:
    out_shape = [
        jax.ShapeDtypeStruct((num_seqs, num_splits, num_heads, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((num_seqs, num_splits, num_heads), jnp.float32),  # m
        jax.ShapeDtypeStruct((num_seqs, num_splits, num_heads), jnp.float32),  # l
    ]
    out_specs = [
        pl.BlockSpec((None, None, num_heads, head_dim), lambda s, h, k: (s, k, 0, 0)),
        pl.BlockSpec((None, None, num_heads), lambda s, h, k: (s, k, 0)),
        pl.BlockSpec((None, None, num_heads), lambda s, h, k: (s, k, 0)),
    ]
  else:
    out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    out_specs = pl.BlockSpec((None, num_heads, head_dim), lambda s, h, k: (s, 0, 0))

  res = pl.pallas_call(
      kernel,
      grid=(num_seqs, num_kv_heads, num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"paged_decode_g{group}_bs{block_size}_p{pages_per_block}_s{num_splits}",
  )(block_tables, context_lens, q, k_cache, v_cache)
  if not split:
    return res
  out, m, l = res
  return _merge_splits(out, m, l).astype(q.dtype)


def _merge_splits(out, m, l):
  """Log-sum-exp merge of split-K partials.

  Args:
    out: ``[S, splits, H, D]`` f32, each split's normalized output.
    m: ``[S, splits, H]`` f32 running max (-inf where a split saw nothing).
    l: ``[S, splits, H]`` f32 softmax denominators relative to ``m``.

  Returns:
    ``[S, H, D]`` f32; zeros for rows no split saw (padding sequences).
  """
  m_max = jnp.max(m, axis=1, keepdims=True)
  m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
  w = l * jnp.exp(m - m_max)  # [S, splits, H]
  denom = jnp.sum(w, axis=1)
  num = jnp.sum(w[..., None] * out, axis=1)
  return num / jnp.where(denom == 0.0, 1.0, denom)[..., None]


def default_decode_params(num_seqs: int, num_kv_heads: int, block_size: int,
                          max_blocks: int, head_dim: int = 128,
                          itemsize: int = 2) -> tuple[int, int]:
  """Picks ``(pages_per_compute_block, num_splits)`` from static shapes."""
  # K and V tiles of at most 32 KiB each (128 keys of bf16 x 128).
  tokens = max(16, (32 * 1024) // (head_dim * itemsize))
  pages = max(1, tokens // block_size)
  pages = min(pages, pl.next_power_of_2(max_blocks))
  pages = max(pages, max(1, 16 // block_size))  # tl.dot needs >= 16 keys
  chunks = pl.cdiv(max_blocks, pages)
  splits = pl.cdiv(_TARGET_PROGRAMS, num_seqs * num_kv_heads)
  splits = max(1, min(splits, chunks, _MAX_SPLITS))
  return pages, splits


@functools.partial(
    jax.jit,
    static_argnames=("scale", "soft_cap", "sliding_window", "k_scale", "v_scale",
                     "pages_per_compute_block", "num_splits", "num_warps",
                     "num_stages", "interpret"))
def paged_decode_attention(
    q: jax.Array,  # [S, num_heads, head_dim]
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
    pages_per_compute_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [S, num_heads, head_dim]
  """Decode attention over a paged KV cache (one query token per sequence).

  Same contract as ``reference.paged_decode_attention_reference``.

  Args:
    q: ``[S, num_heads, head_dim]`` queries, one token per sequence.
    k_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    v_cache: same shape and dtype as ``k_cache``.
    block_tables: ``[S, max_blocks_per_seq]`` int32 page ids (0 pads).
    context_lens: ``[S]`` int32 tokens in the cache, this step's included.
    scale: softmax scale applied to ``q . k``.
    soft_cap: optional logit soft-cap ``cap * tanh(s / cap)``.
    sliding_window: optional window; a query at ``p`` sees ``(p - w, p]``.
    k_scale, v_scale: an fp8 cache's dequantization scales (stored x scale).
    pages_per_compute_block: pages per inner step (power of two); default
      from shapes, about 128 keys of bf16 x 128 (32 KiB tiles).
    num_splits: split-K programs per (sequence, KV head); default from
      shapes, enough programs to fill an H100.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth; default the deepest (up
      to 4) whose K/V buffers fit 160 KiB of shared memory (3 for 32 KiB
      tiles).
    interpret: run the Pallas interpreter (CPU) instead of Triton.

  Returns:
    ``[S, num_heads, head_dim]`` in ``q.dtype``; zeros for padding rows.
  """
  common.check_paged_args(q, k_cache, v_cache, block_tables, context_lens,
                          soft_cap=soft_cap, sliding_window=sliding_window)
  if block_tables.shape[0] != q.shape[0]:
    raise ValueError(f"decode needs one query per sequence: q {q.shape} vs "
                     f"block_tables {block_tables.shape}")
  num_seqs, _, _ = q.shape
  _, block_size, num_kv_heads, _ = k_cache.shape
  max_blocks = block_tables.shape[1]
  pages, splits = default_decode_params(num_seqs, num_kv_heads, block_size, max_blocks,
                                        q.shape[2], q.dtype.itemsize)
  if pages_per_compute_block is not None:
    pages = pages_per_compute_block
  if num_splits is not None:
    splits = num_splits
  if not common.is_power_of_two(pages) or pages * block_size < 16:
    raise ValueError(f"pages_per_compute_block={pages} must be a power of two "
                     f"with pages * block_size ({block_size}) >= 16")
  if splits < 1:
    raise ValueError(f"num_splits={splits} must be >= 1")
  if num_stages is None:
    num_stages = common.default_num_stages(pages * block_size * q.shape[2] * q.dtype.itemsize)
  return _decode_call(
      q, k_cache, v_cache, block_tables, context_lens, scale=float(scale),
      soft_cap=soft_cap, sliding_window=sliding_window, k_scale=float(k_scale),
      v_scale=float(v_scale), pages_per_block=pages,
      num_splits=splits, num_warps=num_warps, num_stages=num_stages,
      interpret=interpret)

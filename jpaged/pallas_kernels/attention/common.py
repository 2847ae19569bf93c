"""Pieces shared by the Pallas paged-attention kernels: argument checks and
the flash-attention online-softmax step (used inside kernel bodies, so it
must stay Triton-lowerable: 2-D dots of power-of-two shapes, f32 math)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# An fp8 KV cache (any query dtype above): the kernels load fp8 tiles and
# upcast them to the query's dtype in registers.
FP8_KV = jnp.dtype(jnp.float8_e4m3fn)


def upcast_kv(x: jax.Array, dtype) -> jax.Array:
  """A loaded K/V tile in the query's dtype (a no-op unless the cache is fp8;
  every e4m3 value is exact in bf16, fp16 and f32)."""
  return x if x.dtype == dtype else x.astype(dtype)


def is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


# Shared memory the K/V pipeline buffers may take (an H100 block gets 227 KiB).
_SMEM_BUDGET = 160 * 1024


def default_num_stages(kv_tile_bytes: int, max_stages: int = 4) -> int:
  """The deepest software pipeline (<= ``max_stages``) whose K and V buffers fit.

  Triton's pipeliner keeps ``num_stages - 1`` buffers of each pipelined load
  (seen compiling the decode kernel for sm_90: 136 KiB at 3 stages of 32 KiB
  K and V tiles), so 3 stages keep one K/V tile in flight while another is
  used. Needs K/V loaded as flat tiles addressed by ids of an earlier step.
  """
  for stages in range(max_stages, 2, -1):
    if (stages - 1) * 2 * kv_tile_bytes <= _SMEM_BUDGET:
      return stages
  return 2


def masked_load(ref, indices, mask, other=0):
  """Gathers ``ref[indices]`` where ``mask``, ``other`` elsewhere.

  Every index is an integer array broadcast to ``mask.shape`` (a power-of-two
  shape): the Triton lowering turns that into one pointer per element, and
  the interpreter supports masked loads only with all-array (or all-slice)
  indexers. Masked-off lanes must still hold in-bounds indices (the
  interpreter gathers them before masking); the GPU never touches them.
  """
  idx = tuple(jnp.broadcast_to(i, mask.shape) for i in indices)
  if jnp.dtype(ref.dtype) == FP8_KV:
    # The Triton lowering cannot cast an integer fill to fp8: give a float one.
    other = float(other)
  return plgpu.load(ref.at[idx], mask=mask, other=other)


def masked_store(ref, indices, value, mask):
  """Scatters ``value`` into ``ref[indices]`` where ``mask``.

  Masked-off lanes must hold *out-of-bounds* indices (e.g. the dimension's
  size): the interpreter rewrites masked lanes with their old values, which
  would race with a valid lane sharing the index; out-of-bounds ones are
  dropped there and never issued on the GPU.
  """
  idx = tuple(jnp.broadcast_to(i, mask.shape) for i in indices)
  plgpu.store(ref.at[idx], value, mask=mask)


# Every kernel dot asks for HIGHEST: for float32 operands the Triton lowering
# then emits IEEE f32 dots instead of its default TF32 (10-bit mantissa, about
# 3e-4 relative error, seen on an H200); bf16 and fp16 operands are unaffected.
DOT_PRECISION = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)


def qk(q: jax.Array, k: jax.Array) -> jax.Array:
  """``q @ k.T`` in f32: ``[M, D] x [N, D] -> [M, N]``."""
  return lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=DOT_PRECISION,
                         preferred_element_type=jnp.float32)


def init_carry(rows: int, head_dim: int):
  """Zero accumulator ``[rows, head_dim]``, max ``-inf`` and sum 0 ``[rows]``."""
  return (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def online_softmax_step(s, v, acc, m_prev, l_prev):
  """One flash-attention update.

  Args:
    s: ``[M, N]`` f32 logits, ``-inf`` where masked (whole rows may be).
    v: ``[N, D]`` values (cache dtype; masked rows must be finite, e.g. 0).
    acc: ``[M, D]`` f32 unnormalized output so far.
    m_prev: ``[M]`` f32 running max (``-inf`` before any valid logit).
    l_prev: ``[M]`` f32 running denominator relative to ``m_prev``.

  Returns:
    The updated ``(acc, m, l)``.
  """
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
  # A row that has seen only masked logits keeps m = -inf; shift by 0 instead
  # so that exp(-inf - -inf) never produces NaN.
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m_prev - m_safe)  # [M]
  p = jnp.exp(s - m_safe[:, None])  # [M, N]
  l_new = alpha * l_prev + jnp.sum(p, axis=1)
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                       precision=DOT_PRECISION, preferred_element_type=jnp.float32)
  return acc * alpha[:, None] + pv, m_new, l_new


def check_paged_args(q, k_cache, v_cache, block_tables, context_lens, *,
                     soft_cap, sliding_window) -> None:
  """Raises ValueError naming the offending shapes or dtypes."""
  if q.ndim != 3:
    raise ValueError(f"q must be [tokens, num_heads, head_dim], got {q.shape}")
  if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
    raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, "
                     f"num_kv_heads, head_dim], got {k_cache.shape} and {v_cache.shape}")
  _, num_heads, head_dim = q.shape
  _, block_size, num_kv_heads, kv_head_dim = k_cache.shape
  if head_dim != kv_head_dim:
    raise ValueError(f"head_dim of q {q.shape} and k_cache {k_cache.shape} differ")
  if not is_power_of_two(head_dim) or head_dim < 16:
    raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim} (q {q.shape})")
  if not is_power_of_two(block_size):
    raise ValueError(f"block_size must be a power of two, got {block_size} "
                     f"(k_cache {k_cache.shape})")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be divisible by "
                     f"num_kv_heads={num_kv_heads} (q {q.shape}, k_cache {k_cache.shape})")
  if k_cache.dtype != v_cache.dtype or (
      k_cache.dtype != q.dtype and jnp.dtype(k_cache.dtype) != FP8_KV):
    raise ValueError(f"k_cache and v_cache must have q's dtype or float8_e4m3fn: q "
                     f"{q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
  if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype {q.dtype} not supported; use one of {SUPPORTED_DTYPES}")
  if block_tables.ndim != 2 or block_tables.dtype != jnp.int32:
    raise ValueError(f"block_tables must be int32 [S, max_blocks], got "
                     f"{block_tables.dtype}{list(block_tables.shape)}")
  num_seqs = block_tables.shape[0]
  if context_lens.shape != (num_seqs,) or context_lens.dtype != jnp.int32:
    raise ValueError(f"context_lens must be int32 [{num_seqs}], got "
                     f"{context_lens.dtype}{list(context_lens.shape)}")
  if soft_cap is not None and soft_cap <= 0:
    raise ValueError(f"soft_cap must be positive, got {soft_cap}")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")

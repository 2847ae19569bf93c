"""Quantized-weight matmul for GPUs: ``x @ dequant(w).T``, unpacked in registers.

One Pallas (Triton) kernel for every `QuantizedWeight` layout the loaders
produce (see ``jpaged/layers/linear.py``): 8-bit values (int8 or fp8 e4m3)
with one scale per output channel or per group of input columns, and 4-bit
values packed two per byte with a zero point, an additive minimum (GGUF
Q4_1) or neither (signed, stored value minus 8). The weight tile is read from
device memory in its stored form (1 or 1/2 byte per weight) and turned into
the activation dtype in registers just before the tensor-core dot, so a
decode step reads a quarter (int4) or half (int8/fp8) of the bf16 bytes.

Layout of the work: the grid is ``(T / block_t, out / block_n, splits)``;
each program loops over its share of the input dimension one tile at a time
and keeps a float32 ``[block_t, block_n]`` accumulator. With one split it
writes the output tile; with several (decode-sized T, where the output tiles
alone are too few programs to keep every multiprocessor reading the weight)
each writes float32 partials that one XLA reduction adds.

- One scale per output channel (``group_size == in``): the integer tile is
  upcast as is (int8 and e4m3 values are exact in bf16 and fp16) and the
  scale multiplies the accumulator once, after the loop.
- Grouped: one loop iteration per group; the tile is dequantized in float32
  (``(q - zero) * scale + min``, per output row) and cast to the activation
  dtype before the dot.
- 4-bit: byte ``j`` of a row holds input columns ``2j`` (low nibble) and
  ``2j + 1`` (high nibble). Rather than interleave the nibbles in registers,
  the wrapper splits the activations into their even and odd columns (a
  cheap XLA slice of the small ``x``), and each iteration does two dots:
  ``x_even @ low.T + x_odd @ high.T``.

GPTQ's act-order permutation is applied to ``x``'s columns before the call,
as in the reference `dense`. The scales (and zero points, minimums) are
transposed to ``[groups, out]`` by the wrapper so that a group's values for
``block_n`` rows load as one contiguous vector.

Tested in ``tests/test_quant_matmul.py`` (interpret mode on CPU against the
reference, H100 lowering on CPU, and un-interpreted on a GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpaged.pallas_kernels.attention import common

_ACT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _dot(a, b):
  """``a @ b.T`` in float32 (HIGHEST: IEEE f32 for f32 operands, not TF32)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=common.DOT_PRECISION,
                         preferred_element_type=jnp.float32)


def _kernel(*refs, bits: int, block_k: int, per_channel: bool, has_zero: bool,
            has_min: bool, act_dtype, num_splits: int):
  if bits == 4:
    xe_ref, xo_ref, q_ref, s_ref, *rest = refs
  else:
    x_ref, q_ref, s_ref, *rest = refs
  z_ref = rest.pop(0) if has_zero else None
  m_ref = rest.pop(0) if has_min else None
  (o_ref,) = rest
  block_t = o_ref.shape[0]
  block_n = o_ref.shape[1]
  k_total = q_ref.shape[1]  # stored columns (packed bytes for 4-bit)
  num_iters = k_total // block_k
  # Split-K: program (i, j, s) covers tiles [s * per_split, (s + 1) * per_split).
  per_split = pl.cdiv(num_iters, num_splits)
  first = pl.program_id(2) * per_split
  last = jnp.minimum(first + per_split, num_iters)

  def dequant(q, g):
    """A stored ``[block_n, block_k]`` tile of group ``g`` as ``act_dtype``."""
    if per_channel:
      return q.astype(act_dtype)
    w = q.astype(jnp.float32)
    if has_zero:
      w = w - z_ref[g, :].astype(jnp.float32)[:, None]
    elif bits == 4 and not has_min:
      w = w - 8.0
    w = w * s_ref[g, :].astype(jnp.float32)[:, None]
    if has_min:
      w = w + m_ref[g, :].astype(jnp.float32)[:, None]
    return w.astype(act_dtype)

  def body(i, acc):
    cols = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    q = q_ref[:, cols]  # [block_n, block_k]
    if bits == 4:
      lo = dequant(q & 0xF, i)
      hi = dequant(q >> 4, i)
      return acc + _dot(xe_ref[:, cols], lo) + _dot(xo_ref[:, cols], hi)
    return acc + _dot(x_ref[:, cols], dequant(q, i))

  acc = lax.fori_loop(first, last, body, jnp.zeros((block_t, block_n), jnp.float32))
  if per_channel:
    acc = acc * s_ref[0, :].astype(jnp.float32)[None, :]
  o_ref[...] = acc.astype(o_ref.dtype)


def kernel_block_k(w) -> int:
  """Stored columns per loop iteration: the group (halved for 4-bit), or 128
  (64 where 128 does not divide the row) for a per-channel scale."""
  stored = w.qvalue.shape[1]
  if w.scale.shape[1] > 1:
    return stored // w.scale.shape[1]
  return 128 if stored % 128 == 0 else 64


def unsupported_reason(x_shape, x_dtype, w, block_n: int) -> str | None:
  """Why `quant_matmul` cannot take these operands (``None`` if it can)."""
  out, stored = w.qvalue.shape
  if jnp.dtype(x_dtype) not in _ACT_DTYPES:
    return f"activation dtype {jnp.dtype(x_dtype)}"
  if len(x_shape) != 2:
    return f"activations of rank {len(x_shape)}"
  if w.bits not in (4, 8):
    return f"{w.bits}-bit weights"
  if w.bits == 4 and w.scale.shape[1] == 1:
    return "4-bit weights with one scale per output channel"
  bk = kernel_block_k(w)
  if bk < 16 or bk & (bk - 1) or stored % bk:
    return f"a tile of {bk} stored columns (group size {w.group_size}, {stored} stored columns)"
  if out % block_n:
    return f"{out} output channels in blocks of {block_n}"
  if w.scale.shape[1] == 1 and (w.zero is not None or w.min is not None):
    return "a per-channel zero point or minimum"
  return None


def default_block_n(out: int, num_tokens: int) -> int:
  """Output channels per program: narrow tiles for decode-sized ``T`` (more
  programs to read the weight in parallel), wide ones for prefill."""
  for bn in ((32, 64, 128) if num_tokens <= 16 else (128, 64, 32)):
    if out % bn == 0:
      return bn
  return 16


# Programs that keep every multiprocessor of an H100 (132) busy about twice.
_TARGET_PROGRAMS = 264


def default_num_splits(num_programs: int, num_iters: int) -> int:
  """Split-K factor: enough programs for the GPU when the output tiles alone are
  too few (decode-sized T on a narrow projection), never more than the tiles
  along K, each split keeping at least 4 of them."""
  if num_programs >= _TARGET_PROGRAMS:
    return 1
  return max(1, min(pl.cdiv(_TARGET_PROGRAMS, num_programs), num_iters // 4))


@functools.partial(jax.jit, static_argnames=(
    "block_t", "block_n", "num_splits", "num_warps", "num_stages", "interpret", "out_dtype"))
def quant_matmul(x: jax.Array, w, *, block_t: int | None = None, block_n: int | None = None,
                 num_splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
                 interpret: bool = False, out_dtype=None) -> jax.Array:
  """``x @ dequantize(w).T`` for x ``[T, in]`` and a `QuantizedWeight` ``[out, in]``.

  Args:
    x: activations, bfloat16, float16 or float32.
    w: a `QuantizedWeight` (8-bit int8/e4m3, or 4-bit packed; per-channel or
      grouped scales; optional zero point, minimum, column permutation).
    block_t: rows of ``x`` per program (a power of two >= 16; default: the
      smallest that covers ``T``, at most 64).
    block_n: output channels per program (default: `default_block_n`).
    num_splits: programs sharing one output tile along the input dimension,
      their float32 partial sums added after the kernel (default:
      `default_num_splits`).
    num_warps, num_stages: Triton launch parameters.
    interpret: run the Pallas interpreter (CPU) instead of Triton.
    out_dtype: result dtype (default ``x.dtype``).

  Returns:
    ``[T, out]`` in ``out_dtype``.

  Raises:
    ValueError: naming the shape, dtype or layout the kernel does not take.
  """
  num_tokens = x.shape[0]
  out = w.qvalue.shape[0]
  if block_n is None:
    block_n = default_block_n(out, num_tokens)
  reason = unsupported_reason(x.shape, x.dtype, w, block_n)
  if reason is not None:
    raise ValueError(f"quant_matmul does not support {reason}")
  if block_t is None:
    block_t = min(64, max(16, pl.next_power_of_2(num_tokens)))
  if w.perm is not None:
    x = x[:, w.perm]
  t_pad = pl.cdiv(num_tokens, block_t) * block_t
  x = jnp.pad(x, ((0, t_pad - num_tokens), (0, 0)))
  xs = [x[:, 0::2], x[:, 1::2]] if w.bits == 4 else [x]
  per_channel = w.scale.shape[1] == 1  # 8-bit only (checked above)
  extras = [a.T for a in (w.scale, w.zero, w.min) if a is not None]  # [groups, out]
  groups = extras[0].shape[0]
  block_k = kernel_block_k(w)
  stored = w.qvalue.shape[1]

  num_iters = stored // block_k
  grid = (t_pad // block_t, out // block_n)
  if num_splits is None:
    num_splits = default_num_splits(grid[0] * grid[1], num_iters)
  num_splits = max(1, min(num_splits, num_iters))
  split = num_splits > 1

  x_spec = pl.BlockSpec((block_t, stored), lambda i, j, s: (i, 0))
  in_specs = [x_spec] * len(xs) + [pl.BlockSpec((block_n, stored), lambda i, j, s: (j, 0))]
  in_specs += [pl.BlockSpec((groups, block_n), lambda i, j, s: (0, j))] * len(extras)
  kernel = functools.partial(
      _kernel, bits=w.bits, block_k=block_k, per_channel=per_channel,
      has_zero=w.zero is not None, has_min=w.min is not None, act_dtype=x.dtype,
      num_splits=num_splits)
  out_dtype = out_dtype or x.dtype
  if split:  # float32 partials [splits, T, out], summed below
    out_shape = jax.ShapeDtypeStruct((num_splits, t_pad, out), jnp.float32)
    out_spec = pl.BlockSpec((None, block_t, block_n), lambda i, j, s: (s, i, j))
  else:
    out_shape = jax.ShapeDtypeStruct((t_pad, out), out_dtype)
    out_spec = pl.BlockSpec((block_t, block_n), lambda i, j, s: (i, j))
  y = pl.pallas_call(
      kernel,
      grid=(*grid, num_splits),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"quant_matmul_w{w.bits}_{'pc' if per_channel else f'g{w.group_size}'}"
           f"{f'_s{num_splits}' if split else ''}",
  )(*xs, w.qvalue, *extras)
  if split:
    y = y.sum(axis=0).astype(out_dtype)
  return y[:num_tokens]

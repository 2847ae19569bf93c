"""Linear weights, plain or quantized, and the one `dense()` that applies them.

A linear layer's weight (Hugging Face layout ``[out, in]``) is either a plain
float array or a `QuantizedWeight`: integer (or fp8) values plus a float
scale per group of ``group_size`` consecutive input columns, and optionally
an integer zero point (``w = (q - zero) * scale``), an additive minimum
(``w = q * scale + min``, GGUF's Q4_1) or a column permutation (GPTQ's
act-order ``g_idx``, made contiguous at load). Every loader (GGUF, GPTQ, AWQ,
compressed-tensors, on-the-fly int8/int4/fp8) repacks its format losslessly
into this one pytree, so the model never knows the file format. 4-bit values
are packed two per byte (element ``2j`` in the low nibble of byte ``j``);
without a zero point or minimum they are signed (stored value minus 8).

`dense` picks the matmul for a quantized weight (`quant_matmul_backend`):
the reference path dequantizes inside the jitted step (float32 arithmetic,
then the activation dtype) and leaves the fusion to XLA (which, on an H100,
does not fuse it: one decode-sized matmul ran 2.1x (int8) to 3.2x (int4)
slower than bf16, BENCHMARKS.md); on a GPU, for up to `PALLAS_MAX_TOKENS` rows, the Pallas kernel of
``jpaged/pallas_kernels/quant_matmul.py`` reads the stored bytes and
dequantizes them in registers instead; fp8 weights in prefill-sized batches
run on fp8 tensor cores (`fp8_w8a8_dense`, activations quantized per row). `quantize_int8`, `quantize_int4` and `quantize_fp8`
turn one float tensor (numpy, on the host) into a `QuantizedWeight`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jpaged import cpu_kernels

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclasses.dataclass
class QuantizedWeight:
    qvalue: jax.Array  # [out, in] int8/uint8/float8_e4m3fn, or [out, in // 2] uint8 (bits=4)
    scale: jax.Array  # [out, in // group_size] float
    zero: jax.Array | None = None  # [out, in // group_size] integer zero point
    min: jax.Array | None = None  # [out, in // group_size] float, added after scaling
    perm: jax.Array | None = None  # [in] int32: stored column j is input column perm[j]
    bits: int = 8  # static
    group_size: int = 0  # static; the number of input columns

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qvalue.shape[0], self.group_size * self.scale.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.qvalue, self.scale, self.zero, self.min,
                                           self.perm) if a is not None)


jax.tree_util.register_dataclass(
    QuantizedWeight, data_fields=["qvalue", "scale", "zero", "min", "perm"],
    meta_fields=["bits", "group_size"])


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedWeight)


def dequantize_stored(w: QuantizedWeight, xp=jnp):
    """float32 ``[out, in]`` in stored column order."""
    q = w.qvalue
    if w.bits == 4:
        q = xp.stack([q & 0xF, q >> 4], axis=-1).reshape(q.shape[0], -1)
    q = q.astype(xp.float32)
    out, groups = w.scale.shape
    q = q.reshape(out, groups, -1)  # [out, G, group_size]
    if w.zero is not None:
        q = q - w.zero.astype(xp.float32)[..., None]
    elif w.bits == 4 and w.min is None:
        q = q - 8.0
    r = q * w.scale.astype(xp.float32)[..., None]
    if w.min is not None:
        r = r + w.min.astype(xp.float32)[..., None]
    return r.reshape(out, -1)


def dequantize(w, dtype=jnp.float32) -> jax.Array:
    """The weight as a float ``[out, in]`` array in the checkpoint's column order."""
    if not is_quantized(w):
        return jnp.asarray(w).astype(dtype)
    r = dequantize_stored(w)
    if w.perm is not None:
        r = r[:, jnp.argsort(w.perm)]
    return r.astype(dtype)


# Which matmul runs a quantized weight, read when the step is traced:
#   auto      on GPUs, the Pallas kernel for up to PALLAS_MAX_TOKENS rows and,
#             above FP8_W8A8_MIN_TOKENS rows, fp8 weights on fp8 tensor cores
#             where the GPU has them (compute capability 8.9+); XLA otherwise
#             (and always on CPUs)
#   xla       the fused dequantize + matmul at every size
#   pallas    the Pallas kernel at every size (on CPUs its interpreter, for tests)
#   fp8_w8a8  fp8 weights on fp8 tensor cores at every size
# A weight the chosen path cannot take (a layout or shape the kernel does not
# support; a non-fp8 weight for fp8_w8a8) goes to XLA.
# Thresholds from scripts/gpu_bench_quant.py on an H100 (BENCHMARKS.md): the
# kernel beat XLA at every T <= 256 (int8 at T=1: 49 us against 148) and lost
# at 2048; fp8 tensor cores beat the kernel at T >= 256, lost at 16 and 64.
QUANT_MATMUL_ENV = "JPAGED_QUANT_MATMUL"
QUANT_MATMUL_CHOICES = ("auto", "xla", "pallas", "fp8_w8a8")
PALLAS_MAX_TOKENS = 256
FP8_W8A8_MIN_TOKENS = 128


def _gpu_has_fp8_dots() -> bool:
    dev = jax.devices()[0]
    try:
        return dev.platform == "gpu" and float(getattr(dev, "compute_capability", 0)) >= 8.9
    except (TypeError, ValueError):
        return False


def _fp8_w8a8_applies(w: QuantizedWeight) -> bool:
    return (w.qvalue.dtype == jnp.float8_e4m3fn and w.scale.shape[1] == 1
            and w.perm is None)


def quant_matmul_backend(num_tokens: int, x_dtype, w: QuantizedWeight) -> str:
    """``"pallas"``, ``"fp8_w8a8"`` or ``"xla"`` for this quantized matmul
    (see `QUANT_MATMUL_ENV`)."""
    choice = os.environ.get(QUANT_MATMUL_ENV, "auto").strip().lower() or "auto"
    if choice not in QUANT_MATMUL_CHOICES:
        raise ValueError(f"{QUANT_MATMUL_ENV}={choice!r} is not one of "
                         f"{', '.join(QUANT_MATMUL_CHOICES)}")
    if choice == "xla":
        return "xla"
    if choice == "fp8_w8a8":
        return "fp8_w8a8" if _fp8_w8a8_applies(w) else "xla"
    from jpaged.pallas_kernels import quant_matmul as qm

    block_n = qm.default_block_n(w.qvalue.shape[0], num_tokens)
    kernel_ok = qm.unsupported_reason((num_tokens, w.shape[1]), x_dtype, w, block_n) is None
    if choice == "pallas":
        return "pallas" if kernel_ok else "xla"
    if jax.default_backend() != "gpu":
        return "xla"
    if num_tokens >= FP8_W8A8_MIN_TOKENS and _fp8_w8a8_applies(w) and _gpu_has_fp8_dots():
        return "fp8_w8a8"
    return "pallas" if kernel_ok and num_tokens <= PALLAS_MAX_TOKENS else "xla"


def dense(x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
    """``x @ w.T + bias`` for x ``[T, in]`` and a plain or quantized ``[out, in]`` weight."""
    path = quant_matmul_backend(x.shape[0], x.dtype, w) if is_quantized(w) else "xla"
    if path == "pallas":
        from jpaged.pallas_kernels import quant_matmul as qm

        y = qm.quant_matmul(x, w, interpret=jax.default_backend() != "gpu")
    elif path == "fp8_w8a8":
        y = fp8_w8a8_dense(x, w)
    elif not is_quantized(w) and cpu_kernels.native_matmul_applies(x, w):
        y = cpu_kernels.matmul_nt(x, w)  # a few rows on a CPU
    else:
        if is_quantized(w):
            if w.perm is not None:
                x = x[:, w.perm]  # cheaper than un-permuting the weight's columns
            w = dequantize_stored(w).astype(x.dtype)
        y = jnp.einsum("ti,oi->to", x, w)
    return y + bias if bias is not None else y


def fp8_w8a8_dense(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """``x @ w.T`` on fp8 tensor cores: each row of ``x`` scaled to e4m3 by its
    own absolute maximum, an e4m3 x e4m3 dot accumulated in float32, then both
    scales applied (W8A8, as vLLM's fp8 path on Hopper). For fp8 weights with one
    scale per output channel; the activation rounding makes it less exact than
    the W8A16 paths (relative error about 3e-2)."""
    if w.qvalue.dtype != jnp.float8_e4m3fn or w.scale.shape[1] != 1 or w.perm is not None:
        raise ValueError("fp8_w8a8_dense needs e4m3 weights with one scale per output "
                         f"channel, got {w.qvalue.dtype} with {w.scale.shape[1]} groups")
    xf = x.astype(jnp.float32)
    x_scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=1, keepdims=True), 1e-12) / FP8_MAX
    xq = (xf / x_scale).astype(jnp.float8_e4m3fn)
    y = jax.lax.dot_general(xq, w.qvalue, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    return (y * x_scale * w.scale[:, 0].astype(jnp.float32)[None, :]).astype(x.dtype)


def embed(w, ids: jax.Array, dtype) -> jax.Array:
    """Rows ``ids`` of an embedding table ``[vocab, dim]`` (plain or quantized)."""
    if not is_quantized(w):
        return jnp.take(w, ids, axis=0)
    rows = jax.tree.map(lambda a: jnp.take(a, ids, axis=0), dataclasses.replace(w, perm=None))
    r = dequantize_stored(rows)
    if w.perm is not None:
        r = r[:, jnp.argsort(w.perm)]
    return r.astype(dtype)


# ----------------------------------------------------------- quantizers (host)
def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 ``[out, in]`` values in [0, 16) -> ``[out, in // 2]``, pairs per byte."""
    q = np.asarray(q, np.uint8)
    assert q.shape[-1] % 2 == 0 and q.max(initial=0) < 16
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _check_2d(w: np.ndarray, group_size: int) -> np.ndarray:
    w = np.asarray(w, np.float32)
    if w.ndim != 2 or w.shape[1] % group_size:
        raise ValueError(f"cannot quantize a tensor of shape {w.shape} in groups of "
                         f"{group_size} input columns")
    return w


def quantize_int8(w: np.ndarray) -> QuantizedWeight:
    """Symmetric int8 with one float32 scale per output channel (W8A16)."""
    w = _check_2d(w, 1)
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return QuantizedWeight(q, scale, bits=8, group_size=w.shape[1])


def quantize_int4(w: np.ndarray, group_size: int = 128) -> QuantizedWeight:
    """Asymmetric 4-bit: per group of ``group_size`` inputs a float32 scale and a
    uint8 zero point in [0, 15], ``w ~= (q - zero) * scale`` (W4A16). An input
    width that ``group_size`` does not divide (SmolLM2's 576 and 128) takes the
    largest of the halvings down to 32 that does."""
    n = np.shape(w)[-1]
    while n % group_size and group_size > 32:
        group_size //= 2
    w = _check_2d(w, group_size)
    out, n = w.shape
    g = w.reshape(out, n // group_size, group_size)
    lo = np.minimum(g.min(axis=-1), 0.0)
    hi = np.maximum(g.max(axis=-1), 0.0)
    scale = (hi - lo) / 15.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return QuantizedWeight(pack_int4(q.reshape(out, n)), scale, zero=zero, bits=4,
                           group_size=group_size)


def quantize_fp8(w: np.ndarray) -> QuantizedWeight:
    """float8_e4m3fn values with one float32 scale per output channel."""
    w = _check_2d(w, 1)
    scale = np.abs(w).max(axis=1, keepdims=True) / FP8_MAX
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    return QuantizedWeight(q, scale, bits=8, group_size=w.shape[1])


QUANTIZERS = {"int8": lambda w, g: quantize_int8(w), "int4": quantize_int4,
              "fp8": lambda w, g: quantize_fp8(w)}


def to_device(w):
    """Put a plain or quantized host weight on the default device, leaf by leaf."""
    return jax.tree.map(jax.device_put, w)

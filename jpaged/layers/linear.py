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

`dense` is the reference path: it dequantizes inside the jitted step
(float32 arithmetic, then the activation dtype) and lets XLA fuse that into
the matmul's operand. `quantize_int8`, `quantize_int4` and `quantize_fp8`
turn one float tensor (numpy, on the host) into a `QuantizedWeight`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

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


def dense(x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
    """``x @ w.T + bias`` for x ``[T, in]`` and a plain or quantized ``[out, in]`` weight."""
    if is_quantized(w):
        if w.perm is not None:
            x = x[:, w.perm]  # cheaper than un-permuting the weight's columns
        w = dequantize_stored(w).astype(x.dtype)
    y = jnp.einsum("ti,oi->to", x, w)
    return y + bias if bias is not None else y


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

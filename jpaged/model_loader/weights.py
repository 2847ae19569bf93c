"""Host-side helpers shared by the format readers: unpacking int32 words,
building a `QuantizedWeight` from unpacked integers, stacking fused parts and
dequantizing on the host (numpy, float32), all exact (integer reindexing and
the same float32 arithmetic as `jpaged.layers.linear.dense`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jpaged.layers.linear import QuantizedWeight, dequantize_stored, is_quantized, pack_int4


def unpack_int32(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words packing ``32 // bits`` values along ``axis`` (value ``i`` of a
    word in bits ``[bits * i, bits * (i + 1))``) -> uint8 values, ``axis``
    ``32 // bits`` times longer."""
    n = 32 // bits
    w = np.asarray(words).view(np.uint32)
    shifts = (np.arange(n, dtype=np.uint32) * bits)
    w = np.moveaxis(w, axis, -1)
    vals = ((w[..., None] >> shifts) & ((1 << bits) - 1)).astype(np.uint8)
    vals = vals.reshape(*w.shape[:-1], w.shape[-1] * n)
    return np.moveaxis(vals, -1, axis)


def from_unpacked(q: np.ndarray, scale: np.ndarray, *, bits: int, zero=None, min=None,
                  g_idx=None, where: str = "") -> QuantizedWeight:
    """A `QuantizedWeight` from integers ``q [out, in]`` (4-bit: unsigned nibbles,
    minus 8 when there is no zero point or minimum) and ``scale [out, G]``.
    A non-trivial ``g_idx [in]`` (GPTQ act-order) becomes a column permutation."""
    out, n = q.shape
    groups = scale.shape[1]
    if n % groups:
        raise ValueError(f"{where}: {n} input columns do not split into {groups} groups")
    group_size = n // groups
    perm = None
    if g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.int64)
        contiguous = np.arange(n) // group_size
        if not np.array_equal(g_idx, contiguous):
            perm = np.argsort(g_idx, kind="stable")
            if not np.array_equal(g_idx[perm], contiguous):
                raise ValueError(f"{where}: g_idx does not put {group_size} columns in "
                                 f"each of {groups} groups")
            q = q[:, perm]
            perm = perm.astype(np.int32)
    if bits == 4:
        qv = pack_int4(q)
    elif bits == 8:
        qv = np.asarray(q, np.uint8 if zero is not None or min is not None else np.int8)
    else:
        raise ValueError(f"{where}: {bits}-bit weights are not supported (4 or 8)")
    return QuantizedWeight(qv, np.asarray(scale), zero=zero, min=min, perm=perm, bits=bits,
                           group_size=group_size)


def concat_out(parts: list, names: list[str]):
    """Stack fused projections along the output dim (arrays, or quantized
    weights of one layout)."""
    if len(parts) == 1:
        return parts[0]
    if not any(is_quantized(p) for p in parts):
        return np.concatenate([np.asarray(p) for p in parts], axis=0)
    if not _same_layout(parts):
        parts = [_widen(p, n) for p, n in zip(parts, names)]
    first = parts[0]
    for n, p in zip(names, parts):
        same = (is_quantized(p) and p.bits == first.bits and p.group_size == first.group_size
                and p.qvalue.dtype == first.qvalue.dtype
                and all((getattr(p, f) is None) == (getattr(first, f) is None)
                        for f in ("zero", "min", "perm")))
        if same and p.perm is not None:
            same = np.array_equal(p.perm, first.perm)
        if not same:
            raise ValueError(f"{n} and {names[0]} are fused into one projection but are "
                             "stored in different quantized layouts (type, bits, group size, "
                             "zero points or g_idx differ)")

    def cat(field):
        vals = [getattr(p, field) for p in parts]
        return None if vals[0] is None else np.concatenate(vals, axis=0)

    return dataclasses.replace(first, qvalue=cat("qvalue"), scale=cat("scale"),
                               zero=cat("zero"), min=cat("min"))


def _same_layout(parts) -> bool:
    a = parts[0]
    return all(is_quantized(p) and p.bits == a.bits and p.qvalue.dtype == a.qvalue.dtype
               and (p.min is None) == (a.min is None) and (p.zero is None) == (a.zero is None)
               for p in parts)


def _widen(p, name: str):
    """A block-format part (GGUF files mix Q8_0/Q4_0/Q4_1 within q/k/v) as int8
    values with an additive minimum: ``d * q + 0`` is ``d * q`` exactly, and
    4-bit values fit in int8, so fused parts share one layout losslessly."""
    if not is_quantized(p) or p.zero is not None or p.perm is not None:
        return p  # left for concat_out to name
    q = p.qvalue
    if p.bits == 4:
        q = np.stack([q & 0xF, q >> 4], axis=-1).reshape(q.shape[0], -1).astype(np.int16)
        if p.min is None:
            q = q - 8
    q = np.asarray(q).astype(np.int8)
    mn = p.min if p.min is not None else np.zeros(p.scale.shape, p.scale.dtype)
    return QuantizedWeight(q, p.scale, min=mn, bits=8, group_size=p.group_size)


def dequantize_host(w: QuantizedWeight) -> np.ndarray:
    """float32 ``[out, in]`` in the checkpoint's column order (numpy)."""
    r = dequantize_stored(w, np)
    if w.perm is not None:
        r = r[:, np.argsort(w.perm)]
    return r

"""compressed-tensors checkpoints (``quant_method: compressed-tensors``).

Three formats, told apart by the tensors a layer holds:

* ``pack-quantized``: ``weight_packed`` int32 ``[N, K * bits / 32]`` packs
  consecutive inputs per word (value ``i`` in bits ``bits*i..``), each stored
  as ``q + 2**(bits-1)``; ``weight_scale`` ``[N, G]``; an optional
  ``weight_zero_point`` (asymmetric) packed the same way along the outputs,
  ``[N * bits / 32, G]``; ``weight_shape`` ``[2]``; optional ``weight_g_idx``.
* ``int-quantized``: ``weight`` int8 ``[N, K]`` with ``weight_scale``
  (``[N, 1]`` per channel, ``[N, G]`` per group or one per tensor) and an
  optional int8 ``weight_zero_point``. Runs as W8A16.
* ``float-quantized``: ``weight`` float8_e4m3fn ``[N, K]`` with ``weight_scale``.

The weight is ``(q - zero_point) * scale``. Activation scales
(``input_scale``) are ignored: activations stay in the compute dtype.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jpaged.layers.linear import QuantizedWeight
from jpaged.model_loader.weights import from_unpacked, unpack_int32


def _num_bits(qc: dict) -> int:
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if "num_bits" in weights:
            return int(weights["num_bits"])
    return 4


def _scale(reader, prefix: str, out: int) -> np.ndarray:
    s = np.asarray(reader.get(prefix + ".weight_scale"))
    if s.size == 1:  # one scale for the tensor
        return np.full((out, 1), s.reshape(()), s.dtype)
    return s.reshape(out, -1)


def load(reader, prefix: str, qc: dict):
    g_idx = reader.get(prefix + ".weight_g_idx") if prefix + ".weight_g_idx" in reader else None
    if prefix + ".weight_packed" in reader:
        bits = _num_bits(qc)
        out, n = (int(x) for x in reader.get(prefix + ".weight_shape"))
        q = unpack_int32(reader.get(prefix + ".weight_packed"), bits, axis=1)[:, :n]
        zero = None
        if prefix + ".weight_zero_point" in reader:
            zp = np.asarray(reader.get(prefix + ".weight_zero_point"))
            if zp.dtype == np.int32:
                zero = unpack_int32(zp, bits, axis=0)[:out]  # already offset, unsigned
            else:
                zero = (zp.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
        elif bits == 8:
            q = (q.astype(np.int16) - 128).astype(np.int8)  # signed, no zero point
        return from_unpacked(q, _scale(reader, prefix, out), bits=bits, zero=zero,
                             g_idx=g_idx, where=prefix)
    if prefix + ".weight" not in reader:
        return None
    if prefix + ".weight_scale" not in reader:  # a layer left unquantized ("ignore")
        return reader.get(prefix + ".weight")
    w = reader.get(prefix + ".weight")
    out, n = w.shape
    scale = _scale(reader, prefix, out)
    if w.dtype == ml_dtypes.float8_e4m3fn:
        if g_idx is not None:
            raise ValueError(f"{prefix}: weight_g_idx with fp8 weights is not supported")
        return QuantizedWeight(np.asarray(w), scale, bits=8, group_size=n // scale.shape[1])
    if w.dtype != np.int8:
        raise ValueError(f"{prefix}.weight has dtype {w.dtype}; compressed-tensors "
                         "int-quantized needs int8 and float-quantized float8_e4m3fn")
    zero = None
    if prefix + ".weight_zero_point" in reader:
        zero = np.asarray(reader.get(prefix + ".weight_zero_point")).astype(np.int8)
        zero = zero.reshape(out, -1)
        if zero.shape[1] != scale.shape[1]:
            zero = np.broadcast_to(zero, scale.shape).copy()
    wq = from_unpacked(np.asarray(w), scale, bits=8, g_idx=g_idx, where=prefix)
    if zero is not None:  # keep signed values; subtract the signed zero point
        wq.zero = zero
    return wq

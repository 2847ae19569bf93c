"""AWQ checkpoints in the GEMM layout (AutoAWQ ``version: gemm``), 4-bit.

Per linear layer with ``K`` inputs and ``N`` outputs: ``qweight`` int32
``[K, N / 8]`` packs eight output columns per word, nibble ``i`` holding
column ``AWQ_ORDER[i]`` of its block of eight; ``qzeros`` int32
``[K / g, N / 8]`` packs zero points the same way; ``scales`` ``[K / g, N]``.
The weight is ``(q[k, n] - zero[k // g, n]) * scales[k // g, n]``.
"""

from __future__ import annotations

import numpy as np

from jpaged.model_loader.weights import from_unpacked, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_UNDO = np.argsort(AWQ_ORDER)  # column j of a block sits in nibble _UNDO[j]


def _columns(packed: np.ndarray) -> np.ndarray:
    """int32 ``[rows, N / 8]`` -> uint8 ``[rows, N]`` in column order."""
    vals = unpack_int32(packed, 4, axis=1)  # nibble order within each block of 8
    n = vals.shape[1]
    idx = (np.arange(n) // 8) * 8 + _UNDO[np.arange(n) % 8]
    return vals[:, idx]


def load(reader, prefix: str, qc: dict):
    if prefix + ".qweight" not in reader:
        return None
    version = str(qc.get("version", "gemm")).lower()
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if version != "gemm" or bits != 4:
        raise ValueError(f"AWQ version={version!r} bits={bits} is not supported "
                         "(4-bit 'gemm' only)")
    q = _columns(reader.get(prefix + ".qweight")).T  # [N, K]
    zero = np.ascontiguousarray(_columns(reader.get(prefix + ".qzeros")).T)  # [N, G]
    scale = np.ascontiguousarray(reader.get(prefix + ".scales").T)  # [N, G]
    return from_unpacked(np.ascontiguousarray(q), scale, bits=4, zero=zero, where=prefix)

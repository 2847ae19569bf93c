"""GPTQ checkpoints (AutoGPTQ / GPTQModel layout), 4- or 8-bit.

Per linear layer with ``K`` inputs, ``N`` outputs and group size ``g``:
``qweight`` int32 ``[K * bits / 32, N]`` packs ``32 / bits`` consecutive
input rows per word (row ``8r + j`` of a 4-bit word in bits ``4j..4j+3``);
``qzeros`` int32 ``[K / g, N * bits / 32]`` packs zero points along the
outputs the same way; ``scales`` ``[K / g, N]``; ``g_idx`` int32 ``[K]`` maps
each input to its group (act-order / ``desc_act`` permutes it). The weight is
``scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``. The original (v1)
format stores ``zero - 1``; ``checkpoint_format: gptq_v2`` stores ``zero``.
"""

from __future__ import annotations

import numpy as np

from jpaged.model_loader.weights import from_unpacked, unpack_int32


def load(reader, prefix: str, qc: dict):
    """The `QuantizedWeight` of layer ``prefix`` (None if the file lacks it)."""
    if prefix + ".qweight" not in reader:
        return None
    bits = int(qc.get("bits", 4))
    q = unpack_int32(reader.get(prefix + ".qweight"), bits, axis=0).T  # [N, K]
    zeros = unpack_int32(reader.get(prefix + ".qzeros"), bits, axis=1)  # [G, N]
    v2 = qc.get("checkpoint_format", "gptq") == "gptq_v2"
    # v1 keeps zero - 1 (an off-by-one in the original packer), so 0 reads back as 16.
    zeros = zeros if v2 else zeros.astype(np.uint16) + 1
    zero = np.ascontiguousarray(zeros.T).astype(np.uint8 if v2 else np.uint16)
    if zero.dtype == np.uint16 and zero.max(initial=0) < 256:
        zero = zero.astype(np.uint8)
    scale = np.ascontiguousarray(reader.get(prefix + ".scales").T)  # [N, G]
    g_idx = reader.get(prefix + ".g_idx") if prefix + ".g_idx" in reader else None
    return from_unpacked(np.ascontiguousarray(q), scale, bits=bits, zero=zero, g_idx=g_idx,
                         where=prefix)

"""Safetensors checkpoints: plain float ones and pre-quantized GPTQ, AWQ and
compressed-tensors ones.

`safetensors_source` opens a model directory (one file, or the shards of
``model.safetensors.index.json``) and returns a function from a Hugging Face
tensor name to a host array, or for a quantized projection's ``weight`` (a
name the file does not hold, but whose ``qweight``/``weight_packed``/int8 or
fp8 ``weight`` it does) a `QuantizedWeight` built by the format's reader. The
format comes from ``quantization_config.quant_method`` in ``config.json``;
``quantization`` may insist on one, and fails if the checkpoint says otherwise.
Tensors numpy cannot name (fp8) are read straight from the file's bytes.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

PREQUANTIZED = ("gptq", "awq", "compressed-tensors")
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def safetensors_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> file, for a single file or a sharded checkpoint."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(model_dir, fname) for name, fname in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return {name: single for name in _header(single)}
    raise ValueError(f"model={model_dir!r} has no model.safetensors or "
                     "model.safetensors.index.json (use load_format='dummy' for random weights)")


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class _Reader:
    """Reads tensors by name across shards; fp8 through a memory map."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._headers: dict[str, dict] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = _header(path)
        info = self._headers[path][name]
        if info["dtype"] in _RAW_DTYPES:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
            start, end = info["data_offsets"]
            raw = np.fromfile(path, np.uint8, count=end - start, offset=8 + n + start)
            return raw.view(_RAW_DTYPES[info["dtype"]]).reshape(info["shape"])
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(name)


def quantization_config(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        hf = json.load(f)
    qc = hf.get("quantization_config")
    if qc is None and os.path.isfile(os.path.join(model_dir, "quantize_config.json")):
        with open(os.path.join(model_dir, "quantize_config.json")) as f:
            qc = dict(json.load(f), quant_method="gptq")
    return qc


def safetensors_source(model_dir: str, quantization: str | None):
    """``(source, quantization)``: the tensor reader, and the quantization with a
    checkpoint's own method filled in."""
    from jpaged.model_loader import awq, compressed_tensors, gptq

    reader = _Reader(safetensors_files(model_dir))
    qc = quantization_config(model_dir)
    method = qc.get("quant_method") if qc else None
    if method is not None and method not in PREQUANTIZED:
        raise ValueError(f"quantization_config.quant_method={method!r} in {model_dir!r} is "
                         f"not supported; supported: {', '.join(PREQUANTIZED)}")
    if quantization in PREQUANTIZED and method != quantization:
        raise ValueError(f"quantization={quantization!r} but {model_dir!r} is "
                         + (f"quantized with {method!r}" if method else "not quantized"))
    if method is not None and quantization not in (None, method, "none"):
        raise ValueError(f"{model_dir!r} is already quantized with {method!r}; "
                         f"quantization={quantization!r} cannot re-quantize it")
    readers = {"gptq": gptq.load, "awq": awq.load, "compressed-tensors": compressed_tensors.load}

    def source(name: str):
        if name in reader:
            if method == "compressed-tensors" and name.endswith(".weight"):
                return compressed_tensors.load(reader, name[:-len(".weight")], qc)
            return reader.get(name)
        if method is not None and name.endswith(".weight"):
            return readers[method](reader, name[:-len(".weight")], qc)
        return None

    return source, quantization if quantization is not None else method

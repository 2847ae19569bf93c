"""`load_model`: any supported checkpoint -> ``(ModelConfig, graphdef, params)``.

1. The format is chosen: a ``.gguf`` file is read by `jpaged.model_loader.gguf`;
   a directory by safetensors (plain, or pre-quantized GPTQ, AWQ or
   compressed-tensors as ``quantization_config`` in ``config.json`` says), by
   orbax (params converted earlier) or as seeded random weights (``dummy``).
2. The model is built abstractly (`nnx.eval_shape`), so no memory is spent on
   initial weights; its parameter paths are the Hugging Face tensor names
   (fused projections stack several, see `checkpoint_names`).
3. `build_params` asks the format's reader for each parameter's tensors, one
   parameter at a time: a float array or a `QuantizedWeight`. Fused parts are
   stacked, ``quantization`` is applied (``int8``/``int4``/``fp8`` quantize the
   decoder's projections on the fly; ``none`` dequantizes a quantized file),
   shapes are checked, and the result goes to the device before the next
   tensor is read, so host memory peaks near one tensor, not the whole model.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from flax import nnx

from jpaged.config.engine import QUANT_GROUP_SIZES as GROUP_SIZES
from jpaged.config.engine import QUANTIZATIONS
from jpaged.config.model import ModelConfig
from jpaged.layers.linear import QUANTIZERS, QuantizedWeight, is_quantized, to_device
from jpaged.model_loader import safetensors as formats
from jpaged.model_loader.dummy import dummy_params
from jpaged.model_loader.orbax import ORBAX_DIR, load_orbax, save_orbax  # noqa: F401
from jpaged.model_loader.weights import concat_out, dequantize_host
from jpaged.models import get_model_class
from jpaged.models.llama import checkpoint_names, is_linear_weight

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy", "orbax", "gguf")
assert set(QUANTIZATIONS) == {"none", "gguf", *QUANTIZERS, *formats.PREQUANTIZED}


def param_name(path: tuple) -> str:
    """nnx state path -> Hugging Face tensor name."""
    return ".".join(str(p) for p in path)


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract param state) without allocating weights."""
    cls = get_model_class(cfg)
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def load_model(model: str, dtype: str = "auto", load_format: str = "auto", seed: int = 0,
               cfg: ModelConfig | None = None, quantization: str | None = None,
               group_size: int = 128):
    """Returns ``(cfg, graphdef, params)`` with params a pytree of jax arrays
    (plain, or `QuantizedWeight` leaves for quantized projections).

    Args:
      model: a Hugging Face model directory or a ``.gguf`` file.
      quantization: None keeps the checkpoint's own format; ``"none"``
        dequantizes; ``"int8"``/``"int4"``/``"fp8"`` quantize the projections
        at load; ``"gptq"``/``"awq"``/``"compressed-tensors"``/``"gguf"``
        insist on that format.
      group_size: input columns per scale for ``"int4"``.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not supported; choose one of "
                         f"{', '.join(LOAD_FORMATS)}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; choose one of "
                         f"{', '.join(QUANTIZATIONS)}")
    if quantization == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"quantization_group_size={group_size} is not supported; choose "
                         f"one of {', '.join(map(str, GROUP_SIZES))}")
    is_gguf = model.endswith(".gguf") or load_format == "gguf"
    if is_gguf:
        from jpaged.model_loader import gguf

        if quantization in formats.PREQUANTIZED:
            raise ValueError(f"quantization={quantization!r} does not apply to the GGUF file "
                             f"{model!r}")
        reader = gguf.open_gguf(model)
        cfg = cfg or ModelConfig.from_hf_dict(gguf.hf_config(reader, model),
                                              dtype=dtype if dtype != "auto" else "float32")
        graphdef, abstract = abstract_model(cfg)
        return cfg, graphdef, build_params(abstract, cfg, gguf.tensor_source(reader, cfg),
                                           quantization, group_size, model)
    if quantization == "gguf":
        raise ValueError(f"quantization='gguf' needs a .gguf file, not {model!r}")
    cfg = cfg or ModelConfig.from_pretrained(model, dtype)
    graphdef, abstract = abstract_model(cfg)
    orbax_dir = os.path.join(os.path.abspath(model), ORBAX_DIR, cfg.dtype)
    if load_format == "auto":
        load_format = ("orbax" if os.path.isdir(orbax_dir) and quantization is None
                       else "safetensors")
    if load_format == "dummy":
        params = dummy_params(cfg, seed)
        if quantization in QUANTIZERS:
            params = _quantize_tree(params, quantization, group_size)
        elif quantization not in (None, "none"):
            raise ValueError(f"quantization={quantization!r} needs a checkpoint; with "
                             "load_format='dummy' use int8, int4 or fp8")
        return cfg, graphdef, params
    if load_format == "orbax":
        if quantization is not None:
            raise ValueError("load_format='orbax' holds float params; drop quantization="
                             f"{quantization!r} or use load_format='safetensors'")
        return cfg, graphdef, load_orbax(orbax_dir, abstract)
    source, quantization = formats.safetensors_source(model, quantization)
    return cfg, graphdef, build_params(abstract, cfg, source, quantization, group_size, model)


def _convert(name: str, w, cfg: ModelConfig, quantization: str | None, group_size: int):
    """One parameter (host array or QuantizedWeight) -> what goes on the device."""
    linear = is_linear_weight(name)
    if quantization in QUANTIZERS and linear:
        return QUANTIZERS[quantization](dequantize_host(w) if is_quantized(w) else w,
                                        group_size)
    if is_quantized(w):
        # Quantized embeddings stay quantized in the file's own format only.
        if quantization is None or quantization in formats.PREQUANTIZED + ("gguf",):
            return w
        return dequantize_host(w).astype(cfg.jnp_dtype)
    return np.asarray(w).astype(cfg.jnp_dtype)


def build_params(abstract, cfg: ModelConfig, source, quantization: str | None,
                 group_size: int, where: str):
    """Fill the abstract state from ``source(hf_name)`` (array or QuantizedWeight),
    one parameter at a time."""
    flat = nnx.to_flat_state(abstract)
    loaded = []
    for path, var in flat:
        name = param_name(path)
        names = checkpoint_names(name)
        parts = [source(n) for n in names]
        for n, p in zip(names, parts):
            if p is None:
                raise ValueError(f"checkpoint {where!r} is missing tensor {n!r} (part of "
                                 f"parameter {name!r}, shape {tuple(var.shape)})")
        w = concat_out(parts, names)
        if tuple(w.shape) != tuple(var.shape):
            got = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(names, parts))
            raise ValueError(f"tensor {got} has the wrong shape: expected "
                             f"{tuple(var.shape)} in total")
        w = _convert(name, w, cfg, quantization, group_size)
        loaded.append((path, var.replace(to_device(w))))
        del w, parts
    return nnx.from_flat_state(loaded)


def _quantize_tree(params, quantization: str, group_size: int):
    """Quantize the projections of loaded float params, one tensor at a time."""
    out = []
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        if is_linear_weight(param_name(path)):
            value = to_device(QUANTIZERS[quantization](np.asarray(value, np.float32),
                                                        group_size))
        out.append((path, var.replace(value)))
    return nnx.from_flat_state(out)


def weight_bytes(params) -> int:
    """Bytes of all parameter leaves (quantized ones at their packed size)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(params))


__all__ = ["load_model", "save_orbax", "weight_bytes", "QuantizedWeight"]

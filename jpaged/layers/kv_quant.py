"""The fp8 KV cache: its dtype names, the write-side quantization and per-layer scales.

With ``kv_cache_dtype`` ``fp8_e4m3`` (``fp8`` is vLLM's alias) every layer's
K and V are stored as ``float8_e4m3fn``: written as ``x / scale`` with a
saturating cast (values past the format's +-448 clip instead of becoming
NaN), and read back as ``stored * scale``. The scales are per layer, one for
K and one for V, 1.0 unless the checkpoint carries ``k_scale``/``v_scale``
tensors (as vLLM's fp8 checkpoints do). They are fixed for an engine's life,
so they travel as static Python floats: the reference backends multiply the
upcast blocks by them, and the Pallas kernels fold them into the score scale
and the output (the same product, without a multiply per cached element).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448


def resolve_kv_cache_dtype(name: str) -> str:
    """``auto`` or ``fp8_e4m3`` (``fp8`` is an alias); ValueError naming a bad one."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={name!r} is not supported; choose one of "
                         f"{', '.join(KV_CACHE_DTYPES)}")
    return "fp8_e4m3" if name == "fp8" else name


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(FP8)


def quantize(x: jax.Array, scale: float) -> jax.Array:
    """``x / scale`` saturated to the fp8 range, then cast."""
    y = x.astype(jnp.float32)
    if scale != 1.0:
        y = y / scale
    return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(FP8)


def dequantize(x: jax.Array, scale: float, dtype=jnp.float32) -> jax.Array:
    """A cache tile upcast to ``dtype`` and multiplied by its scale (1.0 skips it)."""
    y = x.astype(dtype)
    return y if scale == 1.0 else y * jnp.asarray(scale, dtype)


def load_kv_scales(model: str, num_layers: int) -> tuple[tuple[float, float], ...]:
    """Per layer ``(k_scale, v_scale)`` from a safetensors checkpoint's
    ``model.layers.N.self_attn.{k,v}_scale`` tensors; 1.0 where absent (and
    for GGUF files or random weights, which carry none)."""
    import os

    from jpaged.model_loader.safetensors import _Reader, safetensors_files

    ones = ((1.0, 1.0),) * num_layers
    if not os.path.isdir(model):
        return ones
    try:
        reader = _Reader(safetensors_files(model))
    except ValueError:  # no safetensors (dummy or orbax weights)
        return ones
    scales = []
    for i in range(num_layers):
        pair = []
        for kind in ("k_scale", "v_scale"):
            name = f"model.layers.{i}.self_attn.{kind}"
            s = float(np.asarray(reader.get(name), np.float32).reshape(-1)[0]) \
                if name in reader else 1.0
            if not (np.isfinite(s) and s > 0):
                raise ValueError(f"{name}={s} in {model!r} must be a positive number")
            pair.append(s)
        scales.append(tuple(pair))
    return tuple(scales)

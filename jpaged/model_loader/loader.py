"""Load a Hugging Face checkpoint into a Flax model's parameter pytree.

1. `ModelConfig.from_pretrained` reads ``config.json`` (and rejects what it
   cannot run).
2. The model is built abstractly (`nnx.eval_shape`), so no memory is spent
   on initial weights; `nnx.split` gives its graph definition and the
   abstract parameter state, whose paths are the checkpoint's tensor names.
3. Each parameter is read from safetensors (one file, or the shards listed
   in ``model.safetensors.index.json``; fused projections stack their
   checkpoint tensors, see `checkpoint_names`), checked against the expected
   shape, cast and put on the device one at a time, so host memory peaks
   near one copy of the weights.

``load_format="dummy"`` initialises seeded random weights of the right shapes
from ``config.json`` alone (benchmarks). Converted params can be written with
`save_orbax` and read back with ``load_format="orbax"`` for a faster second
load.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from flax import nnx

from jpaged.config.model import ModelConfig
from jpaged.distributed.sharding import constrain_params, param_sharding
from jpaged.models import get_model_class
from jpaged.models.llama import checkpoint_names

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy", "orbax")
ORBAX_DIR = "jpaged-orbax"


def param_name(path: tuple) -> str:
    """nnx state path -> Hugging Face tensor name."""
    return ".".join(str(p) for p in path)


def _safetensors_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> file, for a single file or a sharded checkpoint."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(model_dir, fname) for name, fname in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise ValueError(f"model={model_dir!r} has no model.safetensors or "
                     "model.safetensors.index.json (use load_format='dummy' for random weights)")


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract param state) without allocating weights."""
    cls = get_model_class(cfg)
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def load_model(model_dir: str, dtype: str = "auto", load_format: str = "auto",
               seed: int = 0, cfg: ModelConfig | None = None):
    """Returns ``(cfg, graphdef, params)`` with params a pytree of jax arrays."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} is not supported; choose one of "
                         f"{', '.join(LOAD_FORMATS)}")
    cfg = cfg or ModelConfig.from_pretrained(model_dir, dtype)
    graphdef, abstract = abstract_model(cfg)
    orbax_dir = os.path.join(os.path.abspath(model_dir), ORBAX_DIR, cfg.dtype)
    if load_format == "auto":
        load_format = "orbax" if os.path.isdir(orbax_dir) else "safetensors"
    if load_format == "dummy":
        params = _dummy_params(cfg, seed)
    elif load_format == "orbax":
        params = load_orbax(orbax_dir, abstract)
    else:
        params = _load_safetensors(model_dir, abstract, cfg)
    return cfg, graphdef, params


def _dummy_params(cfg: ModelConfig, seed: int):
    cls = get_model_class(cfg)

    @jax.jit
    def init():
        return constrain_params(nnx.split(cls(cfg, rngs=nnx.Rngs(seed)))[1])

    return init()


def _load_safetensors(model_dir: str, abstract, cfg: ModelConfig):
    import contextlib

    from safetensors import safe_open

    files = _safetensors_files(model_dir)
    flat = nnx.to_flat_state(abstract)
    loaded = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="numpy"))
                   for f in sorted(set(files.values()))}
        for path, var in flat:
            names = checkpoint_names(param_name(path))
            for name in names:
                if name not in files:
                    raise ValueError(f"checkpoint {model_dir!r} is missing tensor {name!r} "
                                     f"(part of parameter {param_name(path)!r}, shape "
                                     f"{tuple(var.shape)})")
            parts = [handles[files[n]].get_tensor(n) for n in names]
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            if tuple(arr.shape) != tuple(var.shape):
                got = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(names, parts))
                raise ValueError(f"tensor {got} has the wrong shape: expected "
                                 f"{tuple(var.shape)} in total")
            # Cast on the host, then send each device only its shard (the mesh in
            # context, see jpaged.distributed): no device holds the whole model.
            loaded[path] = jax.device_put(arr.astype(np.dtype(cfg.jnp_dtype)), param_sharding(var))
            del arr, parts
    return nnx.from_flat_state([(p, v.replace(loaded[p])) for p, v in flat])


def save_orbax(model_dir: str, cfg: ModelConfig, params) -> str:
    """Save converted params next to the checkpoint; ``load_format='auto'`` uses them."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(model_dir), ORBAX_DIR, cfg.dtype)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, nnx.to_pure_dict(params), force=True)
    return path


def load_orbax(path: str, abstract):
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                          nnx.to_pure_dict(abstract))
    with ocp.StandardCheckpointer() as ckpt:
        pure = ckpt.restore(path, target)
    state = abstract
    nnx.replace_by_pure_dict(state, pure)
    return state

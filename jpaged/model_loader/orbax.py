"""Converted float params saved next to a checkpoint with orbax (`save_orbax`)
and read back (`load_orbax`, chosen by ``load_format="auto"`` when present)
for a faster second load."""

from __future__ import annotations

import os

import jax
from flax import nnx

from jpaged.config.model import ModelConfig

ORBAX_DIR = "jpaged-orbax"


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

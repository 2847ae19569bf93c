"""``load_format="dummy"``: seeded random weights of the right shapes, built from
``config.json`` alone (benchmarks of shapes nobody has weights for)."""

from __future__ import annotations

import jax
from flax import nnx

from jpaged.config.model import ModelConfig
from jpaged.models import get_model_class


def dummy_params(cfg: ModelConfig, seed: int):
    cls = get_model_class(cfg)

    @jax.jit
    def init():
        return nnx.split(cls(cfg, rngs=nnx.Rngs(seed)))[1]

    return init()

"""``load_format="dummy"``: seeded random weights of the right shapes, built from
``config.json`` alone (benchmarks of shapes nobody has weights for)."""

from __future__ import annotations

import jax
from flax import nnx

from jpaged.config.model import ModelConfig
from jpaged.distributed.sharding import constrain_params
from jpaged.models import get_model_class


def dummy_params(cfg: ModelConfig, seed: int):
    cls = get_model_class(cfg)

    @jax.jit
    def init():
        # Under a mesh in context each device initialises only its shard.
        return constrain_params(nnx.split(cls(cfg, rngs=nnx.Rngs(seed)))[1])

    return init()

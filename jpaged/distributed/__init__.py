"""Tensor parallelism: the device mesh (`mesh`) and the one table that maps the
model's logical axis names to mesh axes (`sharding`)."""

from jpaged.distributed.mesh import MODEL_AXIS, check_split, make_mesh
from jpaged.distributed.sharding import (
    kv_cache_heads, kv_heads_axis, param_sharding, param_shardings, replicated, tp_size)

__all__ = ["MODEL_AXIS", "check_split", "make_mesh", "kv_cache_heads", "kv_heads_axis",
           "param_sharding", "param_shardings", "replicated", "tp_size"]

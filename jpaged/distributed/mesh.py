"""The device mesh for tensor parallelism: one axis, ``model``, over N devices.

`make_mesh` takes the first ``N / P`` local devices of each of the ``P``
processes (one process on a single node; several under `jax.distributed`),
so every process holds the same share of every tensor. `check_split` rejects,
before anything is loaded, a model whose heads, MLP or vocabulary cannot be
cut into N equal shards, naming the numbers that do not divide.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jpaged.config.model import ModelConfig

MODEL_AXIS = "model"


def make_mesh(tensor_parallel_size: int) -> Mesh:
    """A 1-D ``model`` mesh over ``tensor_parallel_size`` devices of all processes."""
    n = tensor_parallel_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size={n!r} must be a positive integer")
    devices = jax.devices()
    procs = jax.process_count()
    if n > len(devices):
        raise ValueError(
            f"tensor_parallel_size={n} needs {n} devices but only {len(devices)} "
            f"{jax.default_backend()} device(s) are available"
            + (f" across {procs} processes" if procs > 1 else ""))
    if n % procs:
        raise ValueError(f"tensor_parallel_size={n} is not a multiple of num_processes={procs}"
                         " (each process contributes the same number of devices)")
    per_proc = n // procs
    chosen = []
    for p in range(procs):
        local = sorted((d for d in devices if d.process_index == p), key=lambda d: d.id)
        if len(local) < per_proc:
            raise ValueError(f"tensor_parallel_size={n} over {procs} processes needs "
                             f"{per_proc} devices per process; process {p} has {len(local)}")
        chosen += local[:per_proc]
    return Mesh(np.array(chosen), (MODEL_AXIS,), axis_types=(AxisType.Auto,))


def check_split(cfg: ModelConfig, n: int) -> None:
    """Raise a ValueError naming the dimension that N shards cannot split evenly."""
    if n == 1:
        return
    need = [("num_attention_heads", cfg.num_attention_heads),
            ("intermediate_size", cfg.intermediate_size),
            ("vocab_size", cfg.vocab_size)]
    for name, value in need:
        if value % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide {name}={value}")
    kvh = cfg.num_key_value_heads
    # Fewer KV heads than devices: each KV head is copied onto N / kvh devices.
    if kvh % n and n % kvh:
        raise ValueError(f"tensor_parallel_size={n} and num_key_value_heads={kvh}: one must "
                         "divide the other (KV heads are split, or each copied onto "
                         "tensor_parallel_size / num_key_value_heads devices)")

"""Several processes, one mesh: `jax.distributed` start-up and agreement.

jpaged runs multi-host the multi-controller way: every process runs the same
engine on the same requests, and since the scheduler is deterministic, every
process schedules the same steps and launches the same jitted programs, whose
collectives then meet across hosts. `initialize` joins the processes
(coordinator ``HOST:PORT``, process count and id, from `EngineConfig` or the
``JPAGED_COORDINATOR``, ``JPAGED_NUM_PROCESSES`` and ``JPAGED_PROCESS_ID``
environment variables) before anything touches a device. CPU processes talk
through gloo collectives. If a process dies, the coordination service's
heartbeat ends the others (after ``JPAGED_HEARTBEAT_TIMEOUT`` seconds, 100 by
default) instead of leaving them blocked in a collective.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

logger = logging.getLogger(__name__)

ENV = {"distributed_coordinator": "JPAGED_COORDINATOR",
       "num_processes": "JPAGED_NUM_PROCESSES", "process_id": "JPAGED_PROCESS_ID"}


def settings(coordinator: str | None, num_processes: int, process_id: int):
    """``(coordinator, num_processes, process_id)`` with the environment filling
    what the config left at its default, checked."""
    coordinator = coordinator or os.environ.get(ENV["distributed_coordinator"]) or None
    if num_processes == 1 and ENV["num_processes"] in os.environ:
        num_processes = int(os.environ[ENV["num_processes"]])
    if process_id == 0 and ENV["process_id"] in os.environ:
        process_id = int(os.environ[ENV["process_id"]])
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes="
                         f"{num_processes})")
    if num_processes > 1 and not coordinator:
        raise ValueError(f"num_processes={num_processes} needs distributed_coordinator "
                         "HOST:PORT (process 0's address)")
    if coordinator:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"distributed_coordinator={coordinator!r} must be HOST:PORT")
    return coordinator, num_processes, process_id


def initialize(coordinator: str | None, num_processes: int, process_id: int) -> None:
    """Join the other processes (no-op for one process, or if already joined)."""
    coordinator, num_processes, process_id = settings(coordinator, num_processes, process_id)
    if num_processes == 1 or jax.distributed.is_initialized():
        return
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    heartbeat = int(os.environ.get("JPAGED_HEARTBEAT_TIMEOUT", "100"))
    logger.info("joining %d processes at %s as process %d", num_processes, coordinator,
                process_id)
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat)


def is_leader() -> bool:
    """Process 0: the one that serves HTTP and writes outputs."""
    return jax.process_index() == 0


def agree_min(value: int) -> int:
    """The smallest ``value`` over all processes (e.g. KV blocks, which must
    match for the schedulers to stay in step)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.array([value], np.int64))))

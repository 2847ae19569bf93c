"""Keep XLA from loading two cached executables at once.

The warm-up compiles step buckets on several threads, and with the on-disk
compilation cache (`jpaged.engine.llm_engine.enable_compilation_cache`) some
of those compiles are cache hits, which load (deserialize) an executable.
On XLA:CPU (jax 0.10.2) such loads are not safe side by side: the test suite
died at a warm-up with two workers loading at once (an abort), and once with
a load beside the main thread's tracing (a segfault; the warm-up now traces
every bucket before compiling any).

`install()` wraps JAX's cache-load entry point in one lock, so loads run one
at a time while compiles stay parallel (locking compiles too cost serve's
start-up 10 s). It patches a private JAX function, so it checks that it
exists and otherwise leaves JAX as it is (logged).
"""

from __future__ import annotations

import functools
import logging
import threading

logger = logging.getLogger(__name__)

LOAD_LOCK = threading.Lock()


def serialized(fn, lock=LOAD_LOCK):
    """``fn`` that runs under ``lock`` (one call at a time across threads)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with lock:
            return fn(*args, **kwargs)
    wrapper.__jpaged_lock__ = True
    return wrapper


def install() -> bool:
    """Serialize JAX's loads from the compilation cache (once); False if the
    function moved in this JAX."""
    try:
        from jax._src import compilation_cache
    except ImportError:  # pragma: no cover - a JAX without this module
        logger.info("compile-cache lock not installed: jax._src.compilation_cache not found")
        return False
    load = getattr(compilation_cache, "get_executable_and_time", None)
    if load is None:
        logger.info("compile-cache lock not installed: no get_executable_and_time in this JAX")
        return False
    if not getattr(load, "__jpaged_lock__", False):
        compilation_cache.get_executable_and_time = serialized(load)
    return True

"""Keep XLA from loading a cached executable while it compiles another.

The warm-up compiles step buckets on several threads, and with the on-disk
compilation cache (`jpaged.engine.llm_engine.enable_compilation_cache`) some
of those compiles are cache hits, which load (deserialize) an executable.
On XLA:CPU (jax 0.10.2) that load is not safe beside another load or
compile: the test suite died twice at the same warm-up, once with a
segmentation fault (a load on a worker while the main thread's trace
compiled an eager op) and once with an abort (two workers loading at once).

`install()` wraps JAX's two entry points in one readers-writer lock:
compiles share it (they ran concurrently for months without trouble), a
load takes it alone. It patches private JAX functions, so it checks that
they exist and otherwise leaves JAX as it is (logged once).
"""

from __future__ import annotations

import functools
import logging
import threading

logger = logging.getLogger(__name__)


class ReadWriteLock:
    """Many readers or one writer; readers may nest (no writer preference)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()


LOCK = ReadWriteLock()
_installed = False


def _shared(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        LOCK.acquire_read()
        try:
            return fn(*args, **kwargs)
        finally:
            LOCK.release_read()
    wrapper.__jpaged_lock__ = True
    return wrapper


def _exclusive(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        LOCK.acquire_write()
        try:
            return fn(*args, **kwargs)
        finally:
            LOCK.release_write()
    wrapper.__jpaged_lock__ = True
    return wrapper


def install() -> bool:
    """Wrap JAX's compile and cache-load functions (once); False if they moved."""
    global _installed
    if _installed:
        return True
    try:
        from jax._src import compilation_cache, compiler
    except ImportError:  # pragma: no cover - a JAX without these modules
        logger.info("compile lock not installed: jax._src.compiler not found")
        return False
    compile_fn = getattr(compiler, "backend_compile_and_load", None)
    load_fn = getattr(compilation_cache, "get_executable_and_time", None)
    if compile_fn is None or load_fn is None:
        logger.info("compile lock not installed: this JAX has no backend_compile_and_load "
                    "or get_executable_and_time")
        return False
    if not getattr(compile_fn, "__jpaged_lock__", False):
        compiler.backend_compile_and_load = _shared(compile_fn)
    if not getattr(load_fn, "__jpaged_lock__", False):
        compilation_cache.get_executable_and_time = _exclusive(load_fn)
    _installed = True
    return True

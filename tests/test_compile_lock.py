"""The lock that keeps XLA from loading two cached executables at once
(jpaged/runner/compile_lock.py)."""

import threading
import time

from jpaged.runner import compile_lock


def test_serialized_calls_never_overlap():
    active, peak, guard = [0], [0], threading.Lock()

    def load():
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with guard:
            active[0] -= 1
        return "loaded"

    wrapped = compile_lock.serialized(load, threading.Lock())
    results = []
    threads = [threading.Thread(target=lambda: results.append(wrapped())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["loaded"] * 8 and peak[0] == 1


def test_installed_with_the_cache():
    from jax._src import compilation_cache

    from jpaged.engine.llm_engine import enable_compilation_cache

    enable_compilation_cache()  # the suite runs with the default on-disk cache
    assert compile_lock.install()
    load = compilation_cache.get_executable_and_time
    assert getattr(load, "__jpaged_lock__", False)
    assert compile_lock.install() and compilation_cache.get_executable_and_time is load  # once

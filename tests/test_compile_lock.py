"""The readers-writer lock that keeps XLA from loading a cached executable
while it compiles another (jpaged/runner/compile_lock.py)."""

import threading
import time

from jpaged.runner import compile_lock


def test_loads_exclude_compiles_and_each_other():
    lock = compile_lock.ReadWriteLock()
    active, seen, guard = {"r": 0, "w": 0}, [], threading.Lock()

    def note(kind, delta):
        with guard:
            active[kind] += delta
            seen.append(dict(active))

    def reader():
        lock.acquire_read()
        note("r", 1)
        time.sleep(0.02)
        note("r", -1)
        lock.release_read()

    def writer():
        lock.acquire_write()
        note("w", 1)
        time.sleep(0.02)
        note("w", -1)
        lock.release_write()

    threads = [threading.Thread(target=f) for f in [reader, writer] * 6 + [reader] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(not t.is_alive() for t in threads)
    assert all(s["w"] <= 1 and not (s["w"] and s["r"]) for s in seen)  # a load runs alone
    assert max(s["r"] for s in seen) >= 2  # compiles still run side by side


def test_readers_nest():
    lock = compile_lock.ReadWriteLock()
    lock.acquire_read()
    lock.acquire_read()  # a compile inside a compile does not deadlock
    lock.release_read()
    lock.release_read()
    lock.acquire_write()
    lock.release_write()


def test_installed_on_jax_with_the_cache(tmp_path, monkeypatch):
    from jax._src import compilation_cache, compiler

    from jpaged.engine.llm_engine import enable_compilation_cache

    enable_compilation_cache()  # the suite runs with the default on-disk cache
    assert compile_lock.install()
    assert getattr(compiler.backend_compile_and_load, "__jpaged_lock__", False)
    assert getattr(compilation_cache.get_executable_and_time, "__jpaged_lock__", False)
    before = compiler.backend_compile_and_load
    assert compile_lock.install() and compiler.backend_compile_and_load is before  # once

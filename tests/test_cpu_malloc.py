"""`cpu_kernels.keep_freed_memory`: a large buffer allocated and freed on
every step (as XLA:CPU does with a step's temporaries) is faulted in once,
not on every step (in a fresh process each: the setting is process-wide),
and the runner applies it on a CPU."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, resource
from jpaged import cpu_kernels
applied = cpu_kernels.keep_freed_memory()
# As XLA:CPU does with a step's temporary buffers: allocate 40 MiB (more than
# glibc's largest dynamic mmap threshold, 32 MiB), write it all, free it.
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 40 << 20
def step():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 4
print("PROBE", json.dumps({"applied": applied, "faults": faults}))
"""


def probe(mode):
    env = dict(os.environ, JPAGED_CPU_MALLOC=mode, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")][-1]
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_for_the_next_run():
    default, keep = probe("default"), probe("keep")
    assert default["applied"] is False and keep["applied"] is True
    # 40 MiB is 10,240 pages: by default each step faults them in again.
    assert default["faults"] > 5000, default
    assert keep["faults"] < 100, (keep, default)


def test_the_runner_keeps_freed_memory_on_cpu(monkeypatch, llama_dir):
    from jpaged import cpu_kernels
    from jpaged.config.engine import EngineConfig
    from jpaged.engine.llm_engine import LLMEngine

    calls = []
    monkeypatch.setattr(cpu_kernels, "keep_freed_memory", lambda: calls.append(1) or True)
    LLMEngine(EngineConfig(model=llama_dir, compile_all_buckets=False, max_num_seqs=4,
                           max_model_len=64))
    assert calls == [1]

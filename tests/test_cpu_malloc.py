"""`cpu_kernels.keep_freed_memory`: XLA:CPU's per-run temporary buffers stop
being faulted in afresh on every run (each in a fresh process: the setting is
process-wide)."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from jpaged import cpu_kernels
applied = cpu_kernels.keep_freed_memory()
# The first product's 40 MiB output is a temporary of each run: more than
# glibc's largest dynamic mmap threshold (32 MiB), so by default a fresh mmap
# each run.
f = jax.jit(lambda a, b, c: jnp.tanh(a @ b) @ c)
a = jnp.ones((2048, 512), jnp.float32) / 512
b = jnp.ones((512, 5120), jnp.float32)
c = jnp.ones((5120, 64), jnp.float32)
for _ in range(4):
    f(a, b, c).block_until_ready()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(a, b, c).block_until_ready()
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
    # 40 MiB is 10,240 pages: by default each run faults them in again.
    assert default["faults"] > 5000, default
    assert keep["faults"] < default["faults"] / 10, (keep, default)


def test_the_runner_keeps_freed_memory_on_cpu(monkeypatch, llama_dir):
    from jpaged import cpu_kernels
    from jpaged.config.engine import EngineConfig
    from jpaged.engine.llm_engine import LLMEngine

    calls = []
    monkeypatch.setattr(cpu_kernels, "keep_freed_memory", lambda: calls.append(1) or True)
    LLMEngine(EngineConfig(model=llama_dir, compile_all_buckets=False, max_num_seqs=4,
                           max_model_len=64))
    assert calls == [1]

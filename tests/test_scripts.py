"""The benchmark scripts run end to end on tiny settings, so they cannot rot
between the runs that record figures (the GPU ones in --smoke mode on CPU)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_throughput_tiny(tmp_path, llama_dir):
    out = _run(["scripts/bench_throughput.py", "--model", llama_dir, "--num-prompts", "6",
                "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len",
                "256", "--kv-cache-memory", str(1 << 20), "--hf-batch-size", "3"], tmp_path)
    assert "jpaged:" in out and "ratio jpaged / HF:" in out
    assert "share of allocated slots holding tokens" in out


def test_gpu_bench_engine_smoke(tmp_path):
    out = _run(["scripts/gpu_bench_engine.py", "--smoke"], tmp_path)
    assert "| 1 |" in out and "compiles:" in out


def test_gpu_scripts_fail_clearly_without_gpu(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for cmd in (["bash", "scripts/gpu_check.sh"],
                [sys.executable, "scripts/gpu_bench_engine.py"]):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, (cmd, proc.stderr[-2000:])
        assert "no GPU" in proc.stderr

"""The benchmark scripts run end to end on tiny settings, so they cannot rot
between the runs that record figures (the GPU ones in --smoke mode on CPU)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, timeout=600, **env_extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path), **env_extra)
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


def test_bench_latency_tiny(tmp_path, llama_dir):
    out = _run(["scripts/bench_latency.py", "--model", llama_dir, "--warm", "2", "--steps",
                "6", "--max-model-len", "128"], tmp_path)
    assert "weights-read floor" in out and "wall / floor" in out


def test_bench_startup_tiny(tmp_path, llama_dir):
    out = _run(["scripts/bench_startup.py", "--model", llama_dir, "--max-num-seqs", "4",
                "--max-num-batched-tokens", "16", "--max-model-len", "128"], tmp_path)
    assert "healthy after" in out and "(cold compile cache)" in out
    assert "(warm compile cache)" in out and "compiles in" in out


def test_bench_host_tiny(tmp_path):
    out = _run(["scripts/bench_host.py", "--batches", "4", "--lengths", "16", "40", "--steps",
                "4"], tmp_path)
    assert "host ms/step at length 40" in out
    assert out.count("this tree") == 4  # 2 lengths x (async, sync)


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """A gpu_check.sh run folder filled by the GPU scripts' CPU smoke modes."""
    run = tmp_path_factory.mktemp("gpu_run")
    logs = {}
    logs["kernels"] = _run(["scripts/gpu_bench_kernels.py"], run, OUT=str(run),
                           JPAGED_BENCH_SMOKE="1")
    logs["engine"] = _run(["scripts/gpu_bench_engine.py", "--smoke", "--json",
                           str(run / "bench_engine.json")], run)
    logs["ab"] = _run(["scripts/gpu_bench_engine.py", "--smoke", "--ab", "default",
                       "--dump-hlo", str(run / "hlo")], run)
    logs["quant"] = _run(["scripts/gpu_bench_quant.py", "--smoke", "--json",
                          str(run / "bench_quant.json")], run)
    logs["quant_engine"] = _run(["scripts/gpu_bench_engine.py", "--smoke", "--quant-modes",
                                 "none,int8:xla,int8:pallas", "--json",
                                 str(run / "bench_quant_engine.json")], run)
    (run / "ab_default.log").write_text(logs["ab"])
    (run / "env.txt").write_text("python 3, jax 0, cpu (smoke)\n")
    (run / "stages.tsv").write_text("kernel bench\tok\t38\nA/B no_triton_gemm\tSKIPPED(time)\t0\n")
    (run / "test_kernels.log").write_text("....\n46 passed in 12.3s\n")
    (run / "bench_quant.log").write_text(logs["quant"])
    (run / "bench_quant_engine.log").write_text(logs["quant_engine"])
    return run, logs


def test_gpu_bench_kernels_smoke_sweeps_decode(gpu_run):
    run, logs = gpu_run
    assert "decode sweep at batch" in logs["kernels"] and "best: pages_per_compute_block=" in logs["kernels"]
    sweep = json.loads((run / "bench_kernels.json").read_text())["decode_sweep"]
    assert sum(r["default"] for r in sweep["rows"]) == 1
    assert all(r["err_vs_ref"] < 2e-2 for r in sweep["rows"])


def test_gpu_bench_engine_smoke_steady_state(gpu_run):
    run, logs = gpu_run
    out = logs["engine"]
    assert "| on | 1 |" in out and "| off | 4 |" in out and "output tokens/s" in out
    data = json.loads((run / "bench_engine.json").read_text())
    assert [(r["async"], r["batch"]) for r in data["steady"]] == [
        (True, 1), (True, 4), (False, 1), (False, 4)]
    assert data["throughput"]["output_tokens"] > 0
    assert data["throughput"]["compiles"] == 0  # the warm pass compiled everything
    # The device-time column needs the runner's replay_last_step(); say so when absent.
    from jpaged.runner.model_runner import ModelRunner
    if not hasattr(ModelRunner, "replay_last_step"):
        assert "no replay_last_step()" in out
    else:
        assert all(r["device_ms"] > 0 for r in data["steady"])
    ab = [ln for ln in logs["ab"].splitlines() if ln.startswith("AB ")]
    assert len(ab) == 1 and json.loads(ab[0][3:])["command_buffers"].startswith("ENTRY:")


def test_gpu_bench_quant_smoke(gpu_run):
    run, logs = gpu_run
    rows = json.loads((run / "bench_quant.json").read_text())["rows"]
    checks = {r["path"]: r["rel_err"] for r in rows if r["kind"] == "check"}
    assert set(checks) == {"bf16", "xla/int8", "pallas/int8", "xla/int4", "pallas/int4",
                           "xla/fp8", "pallas/fp8", "fp8_w8a8"}
    assert max(v for k, v in checks.items() if k != "fp8_w8a8") < 2e-2
    assert "| tiny | 32 |" in logs["quant"] and "sweep best tiny T=1 pallas/int4" in logs["quant"]
    out = logs["quant_engine"]
    assert "| int8:pallas | 0.00 | 4 |" in out
    modes = json.loads((run / "bench_quant_engine.json").read_text())["rows"]
    assert [r["mode"] for r in modes] == ["none", "none", "int8:xla", "int8:xla",
                                          "int8:pallas", "int8:pallas"]


def test_gpu_summary_table(gpu_run):
    run, _ = gpu_run
    proc = subprocess.run([sys.executable, "scripts/gpu_summary.py", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("kernel tests on the GPU: 46 passed", "decode sweep best: pages",
                   "engine steady state", "throughput:", "A/B no_triton_gemm",
                   "SKIPPED(time)", "default ", "command buffers: ENTRY:",
                   "quantized matmuls, us per matmul", "| tiny | 32 |",
                   "engine with quantized weights", "| int8:pallas | 0.00 | 4 |"):
        assert needle in out, (needle, out)


def test_gpu_scripts_fail_clearly_without_gpu(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for cmd in (["bash", "scripts/gpu_check.sh"],
                [sys.executable, "scripts/gpu_bench_engine.py"]):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, (cmd, proc.stderr[-2000:])
        assert "no GPU" in proc.stderr


def test_bench_long_context_tiny(tmp_path):
    out = _run(["scripts/bench_long_context.py", "--lengths", "300,700",
                "--max-num-batched-tokens", "256", "--decode-steps", "3",
                "--json", str(tmp_path / "long.json")], tmp_path)
    rows = json.loads((tmp_path / "long.json").read_text())
    assert [r["tokens"] for r in rows] == [300, 700] and "prefill" in out
    # Block size 64: 700 + 4 tokens need 11 blocks, and the cache holds exactly those.
    assert [r["peak_kv_blocks"] for r in rows] == [5, 11]
    assert all(r["prefill_tok_s"] > 0 and r["decode_step_ms"] > 0 for r in rows)


def test_bench_goodput_tiny(tmp_path):
    out = _run(["scripts/bench_goodput.py", "--rates", "20", "--num-requests", "8",
                "--policies", "fcfs,slo", "--max-num-batched-tokens", "128",
                "--json", str(tmp_path / "goodput.json")], tmp_path)
    data = json.loads((tmp_path / "goodput.json").read_text())
    assert [r["policy"] for r in data["rows"]] == ["fcfs", "slo"]
    for r in data["rows"]:  # every request accounted for exactly once
        assert sum(r[c][k] for c in ("interactive", "batch")
                   for k in ("met", "late", "expired", "refused")) == 8
    assert "goodput" in out

"""Background warm-up (``background_warmup=True``, the default of ``jpaged
serve`` and ``jpaged chat``): the engine is ready once the smallest and the
largest bucket are compiled; the others compile on a background thread while
steps pad to the smallest compiled bucket that holds them. Outputs equal a
fully warmed engine's, and nothing compiles once the background is done."""

import pytest

from jpaged import LLM, SamplingParams

CFG = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128, block_size=8)


def _greedy(llm, prompts):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12,
                                                ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _record_step_sizes(runner) -> list[int]:
    """From now on, the token bucket of every step the runner launches."""
    sizes, run = [], runner._run

    def recording(buf, layout, decode_only):
        sizes.append(layout.num_tokens)
        return run(buf, layout, decode_only)

    runner._run = recording
    return sizes


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_background_warmup(llama_dir, backend):
    prompts = ["Hello there, how", "The capital of", "One two three four five six"]
    full = LLM(llama_dir, attention_backend=backend, **CFG)
    runner = full.llm_engine.runner
    assert runner.warmup_done.is_set() and runner.ready_buckets == runner.buckets
    expected = _greedy(full, prompts)
    all_compiles = runner.num_compiles
    del full

    llm = LLM(llama_dir, attention_backend=backend, background_warmup=True, **CFG)
    runner = llm.llm_engine.runner
    buckets = runner.buckets
    assert len(buckets) > 2
    # Ready at once with the two ends; the rest may still be compiling.
    assert set(runner.ready_buckets) >= {buckets[0], buckets[-1]}
    assert _greedy(llm, prompts) == expected  # served while (or after) compiling
    assert runner.warmup_done.wait(timeout=600)
    assert runner.ready_buckets == buckets
    assert runner.num_compiles == all_compiles  # each variant compiled exactly once
    sizes = _record_step_sizes(runner)
    assert _greedy(llm, prompts) == expected
    assert runner.num_compiles == all_compiles  # nothing compiled while serving
    assert min(sizes) < buckets[-1]  # small steps use their own buckets again


def test_before_the_background_is_done_steps_use_ready_buckets(llama_dir, monkeypatch,
                                                                request):
    """With the background compile held back, every step runs in one of the two
    buckets compiled up front, and no step compiles."""
    from jpaged.runner import model_runner

    gate = model_runner.threading.Event()
    request.addfinalizer(gate.set)  # a failed check must not hold the thread
    original = model_runner.ModelRunner._compile_rest

    def held(self, *a):
        gate.wait(timeout=600)
        original(self, *a)

    monkeypatch.setattr(model_runner.ModelRunner, "_compile_rest", held)
    llm = LLM(llama_dir, background_warmup=True, **CFG)
    runner = llm.llm_engine.runner
    ends = [runner.buckets[0], runner.buckets[-1]]
    assert runner.ready_buckets == ends and not runner.warmup_done.is_set()
    # The server's gauge counts the compiles still to come, read at each scrape.
    from jpaged.serve.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    metrics.watch(llm.llm_engine)

    def pending():
        return metrics.registry.get_sample_value("jpaged:warmup_compiles_pending",
                                                 {"model_name": "m"})

    assert pending() == len(runner.buckets) - 2
    compiles = runner.num_compiles
    sizes = _record_step_sizes(runner)
    out = _greedy(llm, ["Hello there, how", "The capital of"])
    assert all(len(t) == 12 for t in out)
    assert set(sizes) <= set(ends) and runner.num_compiles == compiles
    gate.set()
    assert runner.warmup_done.wait(timeout=600) and runner.ready_buckets == runner.buckets
    assert pending() == 0


def test_exit_during_background_warmup_is_clean(llama_dir, tmp_path):
    """A process that ends while the background compiles stops after the bucket
    in progress (XLA aborts in C++ teardown if a compile is still running)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "quick_exit.py"
    script.write_text(
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from jpaged import LLM, SamplingParams\n"
        f"llm = LLM({llama_dir!r}, background_warmup=True, max_num_seqs=4,"
        " max_num_batched_tokens=64, max_model_len=128, block_size=8)\n"
        "assert not llm.llm_engine.runner.warmup_done.is_set()\n"
        "out = llm.generate(['Hi'], SamplingParams(max_tokens=2), use_tqdm=False)\n"
        "print('generated', len(out[0].outputs[0].token_ids))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated 2" in proc.stdout and "terminate called" not in proc.stderr
    # The exit waited for the background thread: it either finished or stopped.
    assert "warm-up stopped" in proc.stderr or "warm-up: all " in proc.stderr, proc.stderr[-2000:]

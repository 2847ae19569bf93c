"""`jpaged serve` over two processes on localhost (one CPU device each, one
TP 2 mesh through `jax.distributed` and gloo): process 0 serves HTTP and
journals its engine's commands, process 1 replays them
(`jpaged.distributed.mirror`). Concurrent requests, a stream dropped
mid-way and a later request give the single-process greedy text; SIGTERM
on process 0 ends both cleanly; a killed process 0 ends process 1 with an
error instead of a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from jpaged import LLM, SamplingParams
from serve_helpers import free_port, wait_healthy

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
ENGINE = ["--block-size", "8", "--max-num-seqs", "4", "--max-num-batched-tokens", "16",
          "--max-model-len", "64", "--num-kv-blocks", "48", "--tensor-parallel-size", "2"]


@pytest.fixture(scope="module")
def expected(llama_dir):
    llm = LLM(llama_dir, block_size=8, max_num_seqs=4, max_num_batched_tokens=16,
              max_model_len=64, compile_all_buckets=False)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def _launch(model_dir, tmp_path):
    coord, port = free_port(), free_port()
    procs, logs = [], []
    for i in range(2):
        env = dict(os.environ, JPAGED_COORDINATOR=f"127.0.0.1:{coord}",
                   JPAGED_NUM_PROCESSES="2", JPAGED_PROCESS_ID=str(i),
                   JPAGED_HEARTBEAT_TIMEOUT="10", JAX_PLATFORMS="cpu", JPAGED_API_KEY="",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1")
        log = tmp_path / f"proc{i}.log"
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jpaged.cli", "--log-level", "info", "serve",
             "--model", model_dir,
             "--port", str(port if i == 0 else free_port()), "--served-model-name", "m",
             *ENGINE], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, list(zip(procs, logs)), 300)
    return procs, logs, url


def _complete(url, prompt):
    r = httpx.post(url + "/v1/completions", timeout=120, json=dict(
        model="m", prompt=prompt, max_tokens=8, temperature=0, ignore_eos=True))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _reap(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(30)


def test_two_process_serve_equals_one_process(llama_dir, expected, tmp_path):
    procs, logs, url = _launch(llama_dir, tmp_path)
    try:
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda p: _complete(url, p), PROMPTS)) == expected
        # A stream dropped after its first event: the abort reaches process 1
        # in the journal, and both engines stay in step for the next request.
        with httpx.stream("POST", url + "/v1/completions", timeout=120, json=dict(
                model="m", prompt=PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True,
                stream=True)) as r:
            next(r.iter_lines())
        assert _complete(url, PROMPTS[1]) == expected[1]
        procs[0].send_signal(signal.SIGTERM)
        for p, log in zip(procs, logs):
            assert p.wait(120) == 0, log.read_text()[-3000:]
        assert "process 0 stopped after" in logs[1].read_text()
    finally:
        _reap(procs)


def test_a_killed_process_0_ends_process_1(llama_dir, tmp_path):
    procs, logs, url = _launch(llama_dir, tmp_path)
    try:
        assert _complete(url, PROMPTS[2])
        procs[0].kill()
        start = time.monotonic()
        rc = procs[1].wait(120)
        assert rc != 0 and time.monotonic() - start < 120
    finally:
        _reap(procs)

"""Two processes on localhost, one device each, joined by `jax.distributed`
(gloo collectives on CPU) into one TP 2 mesh: the same greedy tokens as one
process (and transformers); a process that dies mid-run makes the other exit
with an error, bounded by a timeout, instead of hanging."""

import json
import os
import subprocess
import sys
import time

from serve_helpers import free_port
from test_engine import hf_greedy, make_prompts

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")


def _launch(model_dir, prompts, max_tokens, *extra, heartbeat=10):
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JPAGED_COORDINATOR=f"127.0.0.1:{port}",
                   JPAGED_NUM_PROCESSES="2", JPAGED_PROCESS_ID=str(i),
                   JPAGED_HEARTBEAT_TIMEOUT=str(heartbeat), JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, model_dir, json.dumps(prompts), str(max_tokens), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs, timeout):
    outs = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def test_two_processes_give_one_process_tokens(llama_dir):
    prompts = make_prompts(seed=11, lens=(2, 19, 6))
    (rc0, out0, err0), (rc1, _, err1) = _wait(_launch(llama_dir, prompts, 6), timeout=400)
    assert rc0 == 0, err0[-3000:]
    assert rc1 == 0, err1[-3000:]
    assert json.loads(out0.strip().splitlines()[-1]) == hf_greedy(llama_dir, prompts, 6)


def test_a_dying_process_ends_the_other(llama_dir):
    prompts = make_prompts(seed=12, lens=(4, 9))
    start = time.monotonic()
    (rc0, _, err0), (rc1, _, _) = _wait(_launch(llama_dir, prompts, 20, "die"), timeout=400)
    assert rc1 == 3  # the one that died
    assert rc0 != 0, "the surviving process should fail, not finish or hang"
    assert time.monotonic() - start < 400
    # JAX's coordination service names the peer it lost.
    assert "Task 1 heartbeat timeout" in err0, err0[-3000:]


def test_bad_multihost_settings_name_the_values(monkeypatch):
    import pytest

    from jpaged.distributed.multihost import settings

    for var in ("JPAGED_COORDINATOR", "JPAGED_NUM_PROCESSES", "JPAGED_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert settings(None, 1, 0) == (None, 1, 0)
    with pytest.raises(ValueError, match="num_processes=2 needs distributed_coordinator"):
        settings(None, 2, 0)
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        settings("h:1", 2, 2)
    with pytest.raises(ValueError, match="distributed_coordinator='nohost' must be HOST:PORT"):
        settings("nohost", 2, 1)
    monkeypatch.setenv("JPAGED_COORDINATOR", "10.0.0.1:7777")
    monkeypatch.setenv("JPAGED_NUM_PROCESSES", "2")
    monkeypatch.setenv("JPAGED_PROCESS_ID", "1")
    assert settings(None, 1, 0) == ("10.0.0.1:7777", 2, 1)

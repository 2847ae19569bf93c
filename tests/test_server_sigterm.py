"""`jpaged serve` in a subprocess: SIGTERM during traffic lets the requests in
flight finish, answers new ones with 503, then the process exits."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from serve_helpers import ENGINE_KWARGS, free_port, wait_healthy


def _start(llama_dir, tmp_path, *extra):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")
    cmd = [sys.executable, "-m", "jpaged.cli", "--log-level", "INFO", "serve",
           "--model", llama_dir, "--port", str(port), "--served-model-name", "m", *extra]
    for k, v in ENGINE_KWARGS.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "JPAGED_API_KEY": "sk-env"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(url, [(proc, tmp_path / "server.log")], 120)
    except AssertionError:
        proc.kill()
        raise
    return proc, url, log


AUTH = {"Authorization": "Bearer sk-env"}


def test_sigterm_drains_then_exits(llama_dir, tmp_path):
    proc, url, log = _start(llama_dir, tmp_path, "--shutdown-timeout", "60",
                            "--enable-log-requests")
    auth = AUTH
    try:
        results, started = {}, threading.Barrier(5)

        def client(i):
            body = {"model": "m", "prompt": "Tell me a story " * 5, "max_tokens": 400,
                    "ignore_eos": True, "stream": True, "seed": i,
                    "stream_options": {"include_usage": True}}
            chunks = []
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth,
                              timeout=120) as r:
                if r.status_code != 200:
                    results[i] = r.status_code
                    started.abort()
                    return
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        if len(chunks) == 1:
                            started.wait(30)
            results[i] = chunks

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "late"},
                       headers=auth, timeout=10)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] and r.json()["error"]["code"] == 503
        assert httpx.get(url + "/health", timeout=5).status_code == 503
        for t in threads:
            t.join(120)
        for i in range(4):
            chunks = results[i]
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            assert finish[-1] == "length", finish[-5:]
            assert chunks[-1]["usage"]["completion_tokens"] == 400
        assert proc.wait(60) == 0
        text = open(tmp_path / "server.log").read()
        assert text.count("jpaged.serve.requests") == 4, text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_second_sigterm_stops_at_once_and_shuts_the_engine_down(llama_dir, tmp_path):
    proc, url, log = _start(llama_dir, tmp_path, "--shutdown-timeout", "600")
    try:
        body = {"model": "m", "prompt": "Tell me a story", "max_tokens": 480,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH,
                          timeout=60) as r:
            lines = r.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data: {"))
            proc.send_signal(signal.SIGTERM)  # drain: would wait up to 600 s
            time.sleep(0.5)
            assert proc.poll() is None
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)  # stop now
            rc = proc.wait(30)
        assert time.monotonic() - start < 15
        text = open(tmp_path / "server.log").read()
        assert rc == 0, text[-3000:]
        assert "second signal" in text and "engine loop stopped" in text, text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

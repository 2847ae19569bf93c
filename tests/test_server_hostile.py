"""Hostile input, authentication, disconnects, the queue limit, metrics and
engine death, against uvicorn on 127.0.0.1 (real engine, plus a fake one for
the engine-death case)."""

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest

from jpaged.engine.async_llm import AsyncLLM
from jpaged.serve.auth import APIKeyMiddleware
from jpaged.serve.openai.app import build_app
from jpaged.serve.openai.state import ServeConfig
from serve_helpers import API_KEY, MODEL_NAME, FakeEngine, ThreadServer, shared_server
from serve_helpers import metric as _metric

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BIG = "x" * 900_000  # under the 1 MiB body limit once quoted


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = shared_server(llama_dir)
    srv.wait_idle()
    return srv


def raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are (no client-side path normalization)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:  # refused before we finished sending
            pass
    status = int(data.split(b" ", 2)[1]) if data else -1
    return status, data


# --------------------------------------------------------- hostile bodies
C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
CASES = [
    # (path, raw body or JSON object, expected status)
    (C, b'{"prompt": "x",', 400),
    (C, b"[]", 400),
    (C, b'"just a string"', 400),
    (C, b"", 400),
    (C, b"\xff\xfe\x00garbage", 400),
    (C, b"[" * 100_000 + b"]" * 100_000, 400),
    (C, {"prompt": 5}, 400),
    (C, {"prompt": "x", "max_tokens": "10"}, 400),
    (C, {"prompt": "x", "temperature": "hot"}, 400),
    (C, {"prompt": "x", "n": 1.5}, 400),
    (C, {"prompt": "x", "stream": "yes"}, 400),
    (C, {"prompt": "x", "stop": 5}, 400),
    (C, {"prompt": "x", "max_tokens": 10**30}, 400),
    (C, {"prompt": "x", "n": 10**30}, 400),
    (C, {"prompt": "x", "seed": 10**30}, 400),
    (C, {"prompt": "x", "top_k": 10**12}, 400),
    (C, {"prompt": "x", "logprobs": 10**30}, 400),
    (C, {"prompt": "x", "priority": 10**40}, 400),
    (C, b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400),
    (C, b'{"prompt": "x", "temperature": NaN}', 400),
    (C, b'{"prompt": "x", "top_p": Infinity}', 400),
    (C, b'{"prompt": "x", "temperature": -Infinity}', 400),
    (C, b'{"prompt": "x", "temperature": 1e999}', 400),
    (C, {"prompt": "x", "n": 0}, 400),
    (C, {"prompt": "x", "n": -1}, 400),
    (C, {"prompt": "x", "n": 100}, 400),
    (C, {"prompt": "x", "max_tokens": 0}, 400),
    (C, {"prompt": "x", "max_tokens": -5}, 400),
    (C, {"prompt": "x", "max_tokens": 600}, 400),
    (C, {"prompt": [1] * 500, "max_tokens": 100}, 400),
    (C, {"prompt": "x", "logprobs": -1}, 400),
    (C, {"prompt": "x", "logprobs": 21}, 400),
    (C, {"prompt": ""}, 400),
    (C, {"prompt": []}, 400),
    (C, {"prompt": [[]]}, 400),
    (C, {"prompt": [999999]}, 400),
    (C, {"prompt": [-1]}, 400),
    (C, {"prompt": [[1, 2], [5000]]}, 400),
    (C, {"prompt": "x", "top_p": 0}, 400),
    (C, {"prompt": "x", "top_p": 1.5}, 400),
    (C, {"prompt": "x", "top_k": -2}, 400),
    (C, {"prompt": "x", "min_p": 2}, 400),
    (C, {"prompt": "x", "temperature": -1}, 400),
    (C, {"prompt": "x", "temperature": 1e30}, 400),  # over MAX_TEMPERATURE: NaN in float32
    (C, {"prompt": "x", "repetition_penalty": 0}, 400),
    (C, {"prompt": "x", "presence_penalty": 5}, 400),
    (C, {"prompt": "x", "min_tokens": 10, "max_tokens": 5}, 400),
    (C, {"prompt": "x", "stop_token_ids": [-1]}, 400),
    (C, {"prompt": "x", "stop": [""]}, 400),
    (C, {"prompt": "x", "suffix": "y"}, 400),
    (C, {"prompt": "x", "max_tokens": 0}, 400),  # max_tokens=0 needs echo
    (C, {"prompt": "x", "echo": True, "logprobs": 1000}, 400),  # over max_logprobs
    (C, {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400),
    (C, {"prompt": "x", "logit_bias": {"5": 101.0}}, 400),
    (C, {"prompt": "x", "logit_bias": {"abc": 1.0}}, 400),
    (C, {"prompt": "x", "allowed_token_ids": []}, 400),
    (C, {"prompt": "x", "bad_words": [""]}, 400),
    (C, {"prompt": "x", "deadline_ms": -5}, 400),
    (C, {"prompt": "x", "ttft_slo_ms": 0}, 400),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, 400),
    (C, {"prompt": "x", "model": "other"}, 404),
    (C, {"prompt": BIG}, 400),
    (C, {"prompt": "hello " * 140_000}, 400),
    (C, {"prompt": "x", "model": BIG}, 400),
    (C, {"prompt": "x", "stop": [BIG]}, 400),
    (C, {"prompt": "x", "user": BIG}, 400),
    (C, {"prompt": ["x"] * 1000, "max_tokens": 1}, 400),
    (CH, {"messages": "hi"}, 400),
    (CH, {"messages": []}, 400),
    (CH, {"messages": [{"content": "x"}]}, 400),
    (CH, {"messages": [{"role": BIG, "content": "x"}]}, 400),
    (CH, {"messages": [{"role": "user", "content": BIG}]}, 400),
    (CH, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    (CH, {"messages": MSG, "top_logprobs": 2}, 400),
    (CH, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400),
    (CH, {"messages": MSG, "logprobs": "yes"}, 400),
    (CH, {"messages": MSG, "max_completion_tokens": 0}, 400),
    (CH, {"messages": MSG, "max_tokens": 10**20}, 400),
    (CH, {"messages": MSG, "n": 0}, 400),
    (CH, {"messages": MSG, "temperature": None, "top_p": -1}, 400),
    (CH, {"messages": MSG, "model": "nope"}, 404),
    ("/tokenize", {"prompt": 5}, 400),
    ("/tokenize", {}, 400),
    ("/detokenize", {"tokens": [10**9]}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
]


def _send(url: str, path: str, body, headers=AUTH) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=10,
                      headers={**headers, "content-type": "application/json"})


@pytest.mark.parametrize("path,body,status", CASES,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}" for i, c in enumerate(CASES)])
def test_bad_input_gets_4xx_fast(server, path, body, status):
    start = time.monotonic()
    r = _send(server.url, path, body)
    elapsed = time.monotonic() - start
    assert r.status_code == status, r.text[:500]
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert httpx.get(server.url + "/health", timeout=1).status_code == 200


def test_health_answers_during_hostile_traffic(server):
    stop, health = threading.Event(), []

    def poll():
        while not stop.is_set():
            t = time.monotonic()
            code = httpx.get(server.url + "/health", timeout=2).status_code
            health.append((code, time.monotonic() - t))
            time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    try:
        async def flood():
            async with httpx.AsyncClient(timeout=20) as c:
                reqs = [c.post(server.url + p, headers=AUTH, content=b if isinstance(b, bytes)
                               else json.dumps(b).encode()) for p, b, _ in CASES * 2]
                return await asyncio.gather(*reqs)

        codes = [r.status_code for r in asyncio.run(flood())]
    finally:
        stop.set()
        t.join()
    assert codes == [s for _, _, s in CASES * 2]
    assert health and all(c == 200 for c, _ in health)
    assert max(d for _, d in health) < 1.0
    assert server.wait_idle()["running"] == 0


def test_body_and_header_limits(server):
    r = _send(server.url, C, {"prompt": "x" * (1 << 20)})
    assert r.status_code == 413 and "error" in r.json()
    # A chunked body (no Content-Length) over the limit is cut off too.
    def chunks():
        for _ in range(20):
            yield b"x" * 100_000
    r = httpx.post(server.url + C, content=chunks(), headers=AUTH, timeout=10)
    assert r.status_code == 413
    status, _ = raw_request(server.port, f"GET /health HTTP/1.1\r\nHost: a\r\n"
                            f"X-Big: {'a' * 200_000}\r\nConnection: close")
    assert status in (-1, 400, 431)  # refused (or reset while still sending)
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------ auth
ROUTES = [("GET", "/v1/models"), ("POST", C), ("POST", CH), ("POST", "/tokenize"),
          ("POST", "/detokenize"), ("GET", "/version"), ("GET", "/metrics"),
          ("GET", "/nope"), ("GET", "//v1/models"), ("GET", "/v1//models"),
          ("POST", "//v1/completions"), ("GET", "/health/"), ("GET", "//health"),
          ("GET", "/v1/../health"), ("GET", "/HEALTH"), ("GET", "/v1%2Fmodels"),
          ("GET", "/%2Fhealth")]
# ("/%68ealth" is /health itself: uvicorn decodes it, and auth and routing both
# read the decoded scope["path"], so they always agree on the route.)


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_needs_a_key(server, method, path):
    body = b'{"prompt": "x"}'
    for auth in ("", "Authorization: Bearer wrong\r\n", f"Authorization: Basic {API_KEY}\r\n",
                 f"Authorization: Bearer {API_KEY}x\r\n"):
        status, data = raw_request(
            server.port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
            f"Content-Length: {len(body)}\r\nConnection: close", body)
        assert status == 401, (auth, data[:300])
        assert b'"error"' in data


def test_forged_host_and_query_cannot_reach_health(server):
    for host in ("x/health?", "127.0.0.1/health", "localhost:80/health#"):
        status, _ = raw_request(server.port, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n"
                                "Connection: close")
        assert status in (400, 401)
    status, _ = raw_request(server.port, "GET /v1/models?/health HTTP/1.1\r\nHost: a\r\n"
                            "Connection: close")
    assert status == 401
    status, _ = raw_request(server.port, "GET /health HTTP/1.1\r\nHost: x/v1/models?\r\n"
                            "Connection: close")
    assert status in (200, 400)


def test_keys_let_requests_through(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200
    two = {"Authorization": "Bearer sk-second-key"}
    assert httpx.get(server.url + "/version", headers=two).status_code == 200
    status, _ = raw_request(server.port, f"GET //v1/models HTTP/1.1\r\nHost: a\r\n"
                            f"Authorization: Bearer {API_KEY}\r\nConnection: close")
    assert status == 404  # past auth; just no such route


def test_metrics_public_flag():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = APIKeyMiddleware(app, ["k"], {"/health", "/metrics"})
    transport = httpx.ASGITransport(app=mw)

    async def main():
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return [(await c.get(p)).status_code for p in ("/metrics", "/health",
                                                           "/v1/models", "//metrics")]

    assert asyncio.run(main()) == [200, 200, 401, 401]


# ----------------------------------------------------------- disconnects
def test_twenty_streams_half_disconnect(server):
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 120,
            "ignore_eos": True, "stream": True}

    async def client(c, i):
        async with c.stream("POST", server.url + C, json={**body, "seed": i},
                            headers=AUTH) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    n += 1
                    if i % 2 and n == 3:
                        return "left"
                if line == "data: [DONE]":
                    return n

    async def main():
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            return await asyncio.gather(*(client(c, i) for i in range(20)))

    before = _metric(server, 'jpaged:request_success_total{finished_reason="abort"')
    results = asyncio.run(main())
    assert results[1::2] == ["left"] * 10
    assert all(isinstance(n, int) and n > 10 for n in results[0::2])
    st = server.wait_idle()
    assert st["running"] == 0 and st["waiting"] == 0 and st["unfinished"] == 0
    assert st["free"] == st["blocks"] - 1
    aborted = _metric(server, 'jpaged:request_success_total{finished_reason="abort"') - before
    assert 1 <= aborted <= 10  # a stream may finish before its disconnect is seen


def test_non_streaming_disconnect_aborts(server):
    before = _metric(server, 'jpaged:request_success_total{finished_reason="abort"')
    body = json.dumps({"prompt": "x", "max_tokens": 500, "ignore_eos": True, "n": 8}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.sendall(f"POST {C} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {API_KEY}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
              .encode() + body)
    deadline = time.monotonic() + 10
    while server.engine_state()["unfinished"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    s.close()  # the client goes away mid-generation
    st = server.wait_idle()
    assert st["unfinished"] == 0 and st["free"] == st["blocks"] - 1
    assert _metric(server, 'jpaged:request_success_total{finished_reason="abort"') > before


def test_queue_full_answers_503(server):
    server.llm.max_queue_len = 1
    try:
        async def main():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(
                    server.url + C, headers=AUTH,
                    json={"prompt": "x", "max_tokens": 60, "ignore_eos": True})
                    for _ in range(14)))

        rs = asyncio.run(main())
    finally:
        server.llm.max_queue_len = None
    codes = [r.status_code for r in rs]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    r503 = next(r for r in rs if r.status_code == 503)
    assert r503.headers["retry-after"] and r503.json()["error"]["code"] == 503
    server.wait_idle()


# --------------------------------------------------------------- metrics
NAMES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
         "prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total",
         "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
         "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
         "request_queue_time_seconds_count", "request_success_total", "num_compiles"]


def test_metrics_names_and_movement(server):
    r = httpx.get(server.url + "/metrics", headers=AUTH)
    assert r.status_code == 200
    for name in NAMES:
        assert re.search(rf"^jpaged:{name}\{{", r.text, re.M), name
    assert _metric(server, "jpaged:num_compiles") >= 1
    keys = ["jpaged:prompt_tokens_total", "jpaged:generation_tokens_total",
            "jpaged:time_to_first_token_seconds_count", "jpaged:e2e_request_latency_seconds_count",
            "jpaged:inter_token_latency_seconds_count", "jpaged:request_queue_time_seconds_count",
            'jpaged:request_success_total{finished_reason="length"',
            "jpaged:prefix_cache_queries_total"]
    before = {k: _metric(server, k) for k in keys}
    p = "The same long prefix for the cache, repeated for sure. " * 3
    for _ in range(2):
        rr = httpx.post(server.url + C, headers=AUTH, timeout=30,
                        json={"prompt": p, "max_tokens": 5, "ignore_eos": True})
        assert rr.status_code == 200
    after = {k: _metric(server, k) for k in keys}
    for k in keys:
        assert after[k] > before[k], k
    assert _metric(server, "jpaged:prefix_cache_hits_total") > 0


# ---------------------------------------------------------- engine death
def test_engine_error_mid_stream(llama_dir):
    from jpaged.tokenizer import load_tokenizer

    llm = AsyncLLM(FakeEngine(step_delay=0.01, fail_after=5, tokenizer=load_tokenizer(llama_dir)))
    srv = ThreadServer(build_app(llm, ServeConfig(served_model_names=["fake"])), llm)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        with httpx.stream("POST", srv.url + C, json={"prompt": "hi", "max_tokens": 100,
                                                     "stream": True}) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])["error"]
        assert "injected engine failure" in err["message"] and err["code"] == 500
        assert json.loads(lines[0][6:])["choices"][0]["text"]
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503
        r = httpx.post(srv.url + C, json={"prompt": "hi"})
        assert r.status_code == 503 and "error" in r.json()
    finally:
        srv.stop()


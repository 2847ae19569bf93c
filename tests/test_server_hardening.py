"""What a hostile or careless client can do, against uvicorn on 127.0.0.1
with the fake engine (tests/serve_helpers.py): server faults are 500s,
fan-out and work are capped, priority and the prefix cache follow the
server's rules, slow or silent clients are cut off, big responses leave the
event loop free, and log lines carry no raw control characters."""

import asyncio
import json
import logging
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from jpaged.engine.async_llm import AsyncLLM
from jpaged.serve.auth import principal_of
from jpaged.serve.openai.app import build_app
from jpaged.serve.openai.state import ServeConfig
from serve_helpers import FakeEngine, ThreadServer

C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(llama_dir):
    from jpaged.tokenizer import load_tokenizer

    return load_tokenizer(llama_dir)


@pytest.fixture
def make_server(tok):
    made = []

    def make(tokenizer=tok, engine_kw=None, uvicorn_kw=None, max_queue_len=None, **cfg_kw):
        llm = AsyncLLM(FakeEngine(tokenizer=tokenizer, **(engine_kw or {})),
                       max_queue_len=max_queue_len)
        srv = ThreadServer(build_app(llm, ServeConfig(served_model_names=["fake"], **cfg_kw)),
                           llm, **(uvicorn_kw or {}))
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()
        srv.app.state.close()


def _stream_events(url, path, body, headers=None) -> list:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, headers=headers,
                      timeout=30) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]


# ---------------------------------------------------- item 1: server faults
def test_template_machinery_fault_is_500_not_400(make_server, tok, monkeypatch):
    srv = make_server(tok)
    import jpaged.tokenizer

    def missing(*a, **k):
        raise ImportError("apply_chat_template requires jinja2 to be installed")

    monkeypatch.setattr(jpaged.tokenizer, "apply_chat_template", missing)
    r = httpx.post(srv.url + CH, json={"messages": MSG})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "InternalServerError"
    assert "jinja2" in r.json()["error"]["message"]
    monkeypatch.undo()
    state = srv.app.state
    state.cfg.chat_template = "{% if %}"  # the server's template does not parse
    assert httpx.post(srv.url + CH, json={"messages": MSG}).status_code == 500
    state.cfg.chat_template = "{{ raise_exception('roles must alternate') }}"
    r = httpx.post(srv.url + CH, json={"messages": MSG})
    assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]
    state.cfg.chat_template = None
    assert httpx.post(srv.url + CH, json={"messages": MSG, "max_tokens": 2}).status_code == 200


# ------------------------------------------------------- item 6: fan-out
def test_256_prompts_times_n_are_refused_or_capped(make_server):
    srv = make_server()  # the fake engine's max_num_seqs is 8
    r = httpx.post(srv.url + C, json={"prompt": [[5, 6]] * 256, "n": 2, "max_tokens": 1})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "512" in err["message"] and "max_seqs_per_request" in err["message"]
    r = httpx.post(srv.url + CH, json={"messages": MSG, "n": 9, "max_tokens": 1})
    assert r.status_code == 400 and "max_seqs_per_request" in r.text
    assert srv.llm.engine.added == []  # nothing was queued
    r = httpx.post(srv.url + C, json={"prompt": [[5, 6]] * 4, "n": 2, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_fanout_cap_raised_by_config_and_queue_default_is_finite(make_server):
    import argparse

    from jpaged.serve.args import add_serve_args

    srv = make_server(max_seqs_per_request=512)
    r = httpx.post(srv.url + C, json={"prompt": [[5, 6]] * 256, "n": 2, "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 512
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args([])
    assert args.max_queue_len is not None and args.max_queue_len <= 4096


# ------------------------------------------------- item 12: client priority
def test_client_priority_only_when_allowed(make_server):
    srv = make_server()
    assert httpx.post(srv.url + C, json={"prompt": "x", "priority": -5,
                                         "max_tokens": 1}).status_code == 200
    assert [p for _, p, _ in srv.llm.engine.added] == [0]
    srv2 = make_server(allow_client_priority=True)
    assert httpx.post(srv2.url + C, json={"prompt": "x", "priority": -5,
                                          "max_tokens": 1}).status_code == 200
    assert [p for _, p, _ in srv2.llm.engine.added] == [-5]


# ------------------------------------------------ item 9: cache salt
def test_cache_salt_is_per_key_and_not_the_key(make_server):
    srv = make_server(api_keys=["key-one", "key-two"])
    for key in ("key-one", "key-two", "key-one"):
        r = httpx.post(srv.url + C, json={"prompt": "x", "max_tokens": 1},
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    salts = [s for _, _, s in srv.llm.engine.added]
    assert salts[0] == salts[2] == principal_of(b"key-one") != salts[1]
    assert salts[1] == principal_of(b"key-two")
    assert all("key" not in s for s in salts)
    open_srv = make_server()  # no keys: one tenant, one cache
    httpx.post(open_srv.url + C, json={"prompt": "x", "max_tokens": 1})
    assert [s for _, _, s in open_srv.llm.engine.added] == [None]


# ----------------------------------- plausible bugs: usage and EOS-ended streams
def test_chat_usage_with_n_counts_every_choice(make_server, tok):
    srv = make_server(tok)
    body = {"messages": MSG, "n": 3, "max_tokens": 4}
    r = httpx.post(srv.url + CH, json=body)
    assert r.status_code == 200
    assert len(r.json()["choices"]) == 3 and r.json()["usage"]["completion_tokens"] == 12
    events = _stream_events(srv.url, CH, {**body, "stream_options": {"include_usage": True}})
    assert events[-1]["usage"]["completion_tokens"] == 12
    r = httpx.post(srv.url + C, json={"prompt": "x", "n": 3, "max_tokens": 4})
    assert r.json()["usage"]["completion_tokens"] == 12


def test_stream_ending_on_eos_keeps_its_final_chunk(make_server):
    # The 4th token is EOS, text "". Steps are slow enough for each to be
    # its own chunk, so the last chunk has no text, only the finish reason.
    srv = make_server(engine_kw={"eos_after": 3, "step_delay": 0.1})
    for path, body in ((C, {"prompt": "x", "max_tokens": 50}),
                       (CH, {"messages": MSG, "max_tokens": 50})):
        events = _stream_events(srv.url, path, body)
        finals = [c for e in events for c in e["choices"] if c["finish_reason"]]
        assert len(finals) == 1 and finals[0]["finish_reason"] == "stop", events[-2:]
        assert finals[0]["stop_reason"] == 1023
        assert events[-1]["choices"] == [finals[0]]  # the last chunk carries it
        assert finals[0].get("text", (finals[0].get("delta") or {}).get("content")) == ""
        text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or ""
                       for e in events for c in e["choices"])
        assert text == "t1 t2 t3"


# --------------------------------------------- item 13: control chars in logs
def test_log_lines_have_no_raw_control_characters(make_server, caplog):
    srv = make_server()
    evil = "a\nFAKE 200 OK\r\x1b[31mred\u2028"
    with caplog.at_level(logging.INFO):
        r = httpx.post(srv.url + C, json={"prompt": "x", "max_tokens": 1, evil: 1})
        assert r.status_code == 200
    msgs = [rec.getMessage() for rec in caplog.records]
    assert any("FAKE 200 OK" in m for m in msgs), msgs
    for m in msgs:
        assert not any(ch in m for ch in "\n\r\x1b\u2028"), repr(m)


# -------------------------------------------- item 8: slow and idle clients
def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Seconds until the server closes ``sock`` (sending ``trickle`` now and
    then); ``inf`` if it stays open ``seconds``."""
    start = time.monotonic()
    sock.settimeout(0.25)
    while time.monotonic() - start < seconds:
        try:
            if trickle:
                sock.sendall(trickle)
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - start
            if b"HTTP/1.1" in data:  # an answer (e.g. 408): then the close
                continue
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    return float("inf")


def test_slow_request_heads_and_bodies_are_cut_off(make_server):
    srv = make_server(api_keys=["k"], request_body_timeout=1.0,
                      uvicorn_kw={"head_timeout": 1.0, "limit_concurrency": 4})
    # A head sent one byte at a time never completes: closed at the deadline.
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n")
    assert _closed_within(s, 5, trickle=b"X") < 2.5
    s.close()
    # A body that stops arriving: 408 after the body timeout.
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer k\r\n"
              b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
    s.settimeout(5)
    start = time.monotonic()
    data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 3, data[:200]
    s.close()
    # Idle connections past the concurrency cap: new requests get 503 until
    # the head deadline has closed the idle ones.
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    time.sleep(0.2)
    assert httpx.get(srv.url + "/health").status_code == 503
    time.sleep(1.5)
    assert httpx.get(srv.url + "/health").status_code == 200
    for s in idle:
        s.close()


# ------------------------------------------- item 7: tokenization and length
class _SlowTokenizer:
    """The real tokenizer, but a prompt over 10,000 characters takes 1.5 s
    (the time a huge prompt takes to tokenize, with the GIL released)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def __call__(self, text, **kw):
        self.calls.append(len(text))
        if len(text) > 10_000:
            time.sleep(1.5)
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_huge_prompt_does_not_hold_up_others_and_far_too_long_is_refused_untokenized(
        make_server, tok):
    slow = _SlowTokenizer(tok)
    srv = make_server(slow, engine_kw={"max_model_len": 1 << 20})

    async def main():
        async with httpx.AsyncClient(timeout=30) as c:
            big = asyncio.ensure_future(c.post(srv.url + C, json={
                "prompt": "hello " * 20_000, "max_tokens": 1}))
            await asyncio.sleep(0.2)  # the big prompt is being tokenized
            times = []
            for _ in range(3):
                t = time.monotonic()
                r = await c.post(srv.url + C, json={"prompt": "hi", "max_tokens": 1})
                assert r.status_code == 200
                times.append(time.monotonic() - t)
            assert not big.done()  # the others were served while it tokenized
            assert (await big).status_code == 200
            return times

    times = asyncio.run(main())
    assert max(times) < 0.75, times  # well under the big prompt's 1.5 s
    srv2 = make_server(slow)  # max_model_len 512
    n_calls = len(slow.calls)
    start = time.monotonic()
    r = httpx.post(srv2.url + C, json={"prompt": "x" * 900_000})
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
    r = httpx.post(srv2.url + CH, json={"messages": [{"role": "user", "content": "y" * 900_000}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert time.monotonic() - start < 1.0
    assert len(slow.calls) == n_calls  # refused without tokenizing


# ------------------------------------- item 5: big responses and the event loop
_POLLER = textwrap.dedent("""
    import socket, sys, time
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.monotonic()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        print(t, time.monotonic() - t, flush=True)
        time.sleep(0.01)
""")


def test_large_logprobs_response_leaves_health_answering(make_server):
    # The fake engine sleeps 2 ms a step, as a real one waits on its device.
    srv = make_server(engine_kw={"step_delay": 0.002})
    body = {"messages": MSG, "n": 8, "max_tokens": 1000, "logprobs": True, "top_logprobs": 20,
            "ignore_eos": True}
    state = srv.app.state
    windows = []
    orig = state.build

    async def timed_build(fn, *args):
        t = time.monotonic()
        try:
            return await orig(fn, *args)
        finally:
            windows.append((t, time.monotonic()))

    state.build = timed_build

    def attempt() -> tuple[float, int]:
        """(worst /health latency while the response was built, polls then)"""
        # CLOCK_MONOTONIC is one clock for every process, so the poller's
        # times and the build window compare.
        poller = subprocess.Popen([sys.executable, "-c", _POLLER, str(srv.port), "3600"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            r = httpx.post(srv.url + CH, json=body, timeout=120)
        finally:
            poller.kill()
        out, _ = poller.communicate(timeout=30)
        assert r.status_code == 200
        content = r.json()["choices"][7]["logprobs"]["content"]
        assert len(content) == 1000 and len(content[0]["top_logprobs"]) == 20
        b0, b1 = windows[-1]
        polls = [(float(a), float(b)) for a, b in (ln.split() for ln in out.splitlines())]
        during = [lat for t, lat in polls if t < b1 and t + lat > b0]
        return max(during, default=float("inf")), len(during)

    # A second try only for a machine too busy to schedule the poller in
    # time; a response built on the event loop stalls /health both times.
    results = [attempt()]
    if results[0][0] >= 0.1:
        results.append(attempt())
    worst, polls = results[-1]
    assert polls >= 2 and worst < 0.1, results
    # Over the work cap: refused up front, naming the limit.
    r = httpx.post(srv.url + CH, json={**body, "max_tokens": 30_000})
    assert r.status_code == 400 and "max_request_work" in r.json()["error"]["message"]


def test_samples_finishing_at_different_steps_finish_once_each(make_server):
    # Sample k stops 2k tokens early; slow steps: one chunk per step.
    srv = make_server(engine_kw={"stagger": 2, "step_delay": 0.03})
    for path, body in ((C, {"prompt": "x"}), (CH, {"messages": MSG})):
        events = _stream_events(srv.url, path, {**body, "n": 3, "max_tokens": 6,
                                                "stream_options": {"include_usage": True}})
        finishes = [(c["index"], c["finish_reason"]) for e in events for c in e["choices"]
                    if c["finish_reason"]]
        assert sorted(finishes) == [(0, "length"), (1, "length"), (2, "length")], finishes
        assert events[-1]["usage"]["completion_tokens"] == 6 + 4 + 2
        for k, n in ((0, 6), (1, 4), (2, 2)):
            text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or ""
                           for e in events for c in e["choices"] if c["index"] == k)
            assert text == " ".join(f"t{t}" for t in range(1, n + 1)), (k, text)


# ------------------------------------------ item 2: a client that never reads
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_never_reading_client_is_bounded_then_cut_off(make_server):
    """A client holds a stream for 10 s without reading while others are
    served: the server's memory stays bounded by that stream's own output,
    and once its socket has been full for send_timeout the stream is aborted
    (its blocks freed)."""
    srv = make_server(send_timeout=4.0, engine_kw={"pad": 5000, "step_delay": 0.002})
    engine = srv.llm.engine
    assert httpx.post(srv.url + C, json={"prompt": "y", "max_tokens": 3}).status_code == 200
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    silent.connect(("127.0.0.1", srv.port))
    body = json.dumps({"prompt": "x", "max_tokens": 1_000_000, "stream": True}).encode()
    silent.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: "
                   b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    rss0 = peak = _rss()
    start = time.monotonic()
    served = 0
    while time.monotonic() - start < 10:
        t = time.monotonic()
        r = httpx.post(srv.url + C, json={"prompt": "y", "max_tokens": 3}, timeout=10)
        assert r.status_code == 200 and time.monotonic() - t < 1.0
        served += 1
        peak = max(peak, _rss())
        time.sleep(0.05)
    deadline = time.monotonic() + 20
    while not any(rid.startswith("cmpl-") and rid in engine.generated_at_abort
                  for rid in engine.aborted):
        assert time.monotonic() < deadline, "the silent stream was never aborted"
        peak = max(peak, _rss())
        time.sleep(0.1)
    (rid,) = [r for r in engine.aborted]
    generated = engine.generated_at_abort[rid]
    silent.close()
    # Its output: ~5 kB a token; kept once, not once per step.
    own = generated * 5100
    assert generated > 1000 and served > 20
    assert peak - rss0 < own + 64 << 20, (peak - rss0, own)
    assert srv.llm.call(lambda e: not e.has_unfinished_requests())

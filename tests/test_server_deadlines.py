"""Deadlines and logits processors over HTTP, against the shared real-engine
server: a request that cannot start before its deadline is a 503 with
Retry-After and OpenAI's error body; one that passes its deadline while
running ends with its partial output (finish_reason "length", stop_reason
"deadline") and frees its blocks."""

import httpx
import pytest

from serve_helpers import API_KEY, MODEL_NAME, shared_server

H = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(llama_dir):
    return shared_server(llama_dir)


def post(server, **body):
    return httpx.post(server.url + "/v1/completions", headers=H, timeout=60,
                      json={"model": MODEL_NAME, "prompt": "Once upon a time", **body})


def test_refused_past_deadline_is_503_with_retry_after(server):
    r = post(server, max_tokens=4, deadline_ms=0.001)
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) >= 1
    err = r.json()["error"]
    assert err["type"] == "ServiceUnavailableError" and "refused" in err["message"]
    assert set(err) >= {"message", "type", "param", "code"}
    st = server.wait_idle()
    assert st["free"] == st["blocks"] - 1


def test_running_past_deadline_ends_with_partial_output(server):
    r = post(server, max_tokens=480, ignore_eos=True, temperature=0, deadline_ms=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("length", "deadline")
    assert 0 < r.json()["usage"]["completion_tokens"] < 480
    st = server.wait_idle()
    assert st["free"] == st["blocks"] - 1 and not st["running"]


def test_logits_processor_fields(server):
    r = post(server, max_tokens=3, temperature=0, logit_bias={"5": 100}, ignore_eos=True)
    assert r.status_code == 200, r.text
    a = post(server, max_tokens=3, temperature=0, allowed_token_ids=[5], ignore_eos=True)
    assert a.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    bad = post(server, max_tokens=3, logit_bias={"99999999": 1})
    assert bad.status_code == 400 and "logit_bias" in bad.json()["error"]["message"]


def test_stream_refused_while_waiting_is_a_503_event(server):
    """Accepted, then refused in the queue (its deadline passed while every
    sequence slot was taken): the stream's error event says 503, not 500."""
    import json
    import threading

    hog_started, release = threading.Event(), threading.Event()

    def hog():  # n=8 takes every slot of the shared server's engine
        with httpx.stream("POST", server.url + "/v1/completions", headers=H, timeout=60, json={
                "model": MODEL_NAME, "prompt": "hog", "n": 8, "max_tokens": 400,
                "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    hog_started.set()
                    release.wait(30)
                    return  # leaving closes the stream: the hog is aborted

    t = threading.Thread(target=hog, daemon=True)
    t.start()
    assert hog_started.wait(60)
    with httpx.stream("POST", server.url + "/v1/completions", headers=H, timeout=60, json={
            "model": MODEL_NAME, "prompt": "late", "max_tokens": 4, "stream": True,
            "deadline_ms": 150}) as r:
        assert r.status_code == 200
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    release.set()
    t.join(30)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 503 and err["type"] == "ServiceUnavailableError", err
    assert "refused" in err["message"]
    st = server.wait_idle()
    assert st["free"] == st["blocks"] - 1

"""``/v1/stream`` over a real uvicorn WebSocket and the tiny engine the HTTP
tests share: the same text as the SSE stream, cancel and close free the
blocks, requests interleave on one socket, bad messages get error messages
on a socket that stays usable, and the upgrade needs credentials."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from serve_helpers import API_KEY, MODEL_NAME, shared_server

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CMPL = {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 12,
        "temperature": 0, "ignore_eos": True}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi!"}],
        "max_tokens": 10, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(llama_dir):
    return shared_server(llama_dir)


def ws_url(server) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/stream"


def recv(ws) -> dict:
    return json.loads(ws.recv(timeout=60))


def run(ws, rid, kind, body) -> tuple[list[dict], dict]:
    """Send one request and read until its done (or error) message."""
    ws.send(json.dumps({"type": kind, "id": rid, "body": body}))
    deltas = []
    while True:
        m = recv(ws)
        assert m["id"] == rid, m
        if m["type"] == "delta":
            deltas.append(m["data"])
        else:
            return deltas, m


def sse_chunks(server, path, body) -> list[dict]:
    with httpx.stream("POST", server.url + path, headers=HEADERS, timeout=60,
                      json=dict(body, stream=True)) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def _text(chunks, chat=False) -> str:
    if chat:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"])
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def test_completion_and_chat_match_sse(server):
    with connect(ws_url(server), additional_headers=HEADERS) as ws:
        deltas, done = run(ws, "c1", "completion.create", CMPL)
        assert done == {"type": "done", "id": "c1", "usage": done["usage"]}
        assert done["usage"]["completion_tokens"] == 12
        assert _text(deltas) == _text(sse_chunks(server, "/v1/completions", CMPL))
        assert deltas[-1]["choices"][0]["finish_reason"] == "length"
        assert deltas[0]["object"] == "text_completion"  # the SSE chunk's own shape
        deltas, done = run(ws, "c2", "chat.completion.create", CHAT)
        assert done["type"] == "done" and done["usage"]["completion_tokens"] == 10
        want = sse_chunks(server, "/v1/chat/completions", CHAT)
        assert _text(deltas, chat=True) == _text(want, chat=True)
        assert deltas[0]["choices"][0]["delta"]["role"] == "assistant"


def test_cancel_frees_blocks(server):
    with connect(ws_url(server), additional_headers=HEADERS) as ws:
        ws.send(json.dumps({"type": "completion.create", "id": 7,
                            "body": dict(CMPL, max_tokens=400)}))
        assert recv(ws)["type"] == "delta"
        assert server.engine_state()["running"] == 1
        ws.send(json.dumps({"type": "cancel", "id": 7}))
        while (m := recv(ws))["type"] == "delta":
            pass
        assert m == {"type": "cancelled", "id": "7"}
        st = server.wait_idle()
        assert st["running"] == st["unfinished"] == 0 and st["free"] == st["blocks"] - 1
        # The socket goes on serving.
        assert run(ws, "next", "completion.create", CMPL)[1]["type"] == "done"


def test_closing_the_socket_frees_blocks(server):
    with connect(ws_url(server), additional_headers=HEADERS) as ws:
        for rid in ("a", "b"):
            ws.send(json.dumps({"type": "completion.create", "id": rid,
                                "body": dict(CMPL, max_tokens=400)}))
        recv(ws), recv(ws)
    st = server.wait_idle()
    assert st["running"] == st["unfinished"] == 0 and st["free"] == st["blocks"] - 1


def test_two_interleaved_requests_on_one_socket(server):
    bodies = {"x": dict(CMPL, max_tokens=30), "y": dict(CMPL, prompt="Hello", max_tokens=30)}
    with connect(ws_url(server), additional_headers=HEADERS) as ws:
        for rid, body in bodies.items():
            ws.send(json.dumps({"type": "completion.create", "id": rid, "body": body}))
        order, texts, done = [], {"x": "", "y": ""}, {}
        while len(done) < 2:
            m = recv(ws)
            order.append((m["type"], m["id"]))
            if m["type"] == "delta":
                texts[m["id"]] += m["data"]["choices"][0]["text"]
            else:
                assert m["type"] == "done", m
                done[m["id"]] = m["usage"]
    first_done = min(order.index(("done", "x")), order.index(("done", "y")))
    assert {rid for _, rid in order[:first_done]} == {"x", "y"}  # really interleaved
    for rid, body in bodies.items():
        assert texts[rid] == _text(sse_chunks(server, "/v1/completions", body))
        assert done[rid]["completion_tokens"] == 30


def test_bad_messages_get_errors_and_the_socket_stays(server):
    big = json.dumps({"type": "completion.create", "id": "big",
                      "body": dict(CMPL, prompt="x" * (2 << 20))})
    cases = [("{not json", None, 400), ("[1, 2]", None, 400),
             (json.dumps({"type": "completion.delete", "id": "u"}), "u", 400),
             (json.dumps({"type": "completion.create", "id": "nb"}), "nb", 400),
             (json.dumps({"type": "completion.create", "id": "t",
                          "body": dict(CMPL, temperature=-1)}), "t", 400),
             (json.dumps({"type": "completion.create", "id": "m",
                          "body": dict(CMPL, model="nope")}), "m", 404),
             (json.dumps({"type": "cancel", "id": "ghost"}), "ghost", 404),
             (big, None, 413)]
    with connect(ws_url(server), additional_headers=HEADERS, max_size=None) as ws:
        for raw, rid, code in cases:
            ws.send(raw)
            m = recv(ws)
            assert m["type"] == "error" and m["id"] == rid, (raw[:60], m)
            assert set(m["error"]) == {"message", "type", "param", "code"}
            assert m["error"]["code"] == code, (raw[:60], m)
        _, done = run(ws, "ok", "completion.create", CMPL)
        assert done["type"] == "done"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}])
def test_upgrade_needs_credentials(server, headers):
    with pytest.raises(InvalidStatus) as e:
        with connect(ws_url(server), additional_headers=headers):
            pass
    assert e.value.response.status_code == 403

"""Clients that leave and tenants that share a server, on the real engine
(uvicorn on 127.0.0.1, the session's shared server): nothing is left behind
by a thousand disconnects, and one API key's prompts are not visible to
another through the prefix cache."""

import asyncio
import json
import time

import httpx
import pytest

from serve_helpers import API_KEY, MODEL_NAME, metric, shared_server

C = "/v1/completions"


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = shared_server(llama_dir)
    srv.wait_idle()
    return srv


def test_thousand_disconnects_leave_nothing_behind(server):
    """1,000 streams dropped by their clients (before the first token, or
    after it): the metrics hold no per-request entry, the engine has no
    request and every block is free."""
    body = json.dumps({"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 200,
                       "ignore_eos": True, "stream": True}).encode()
    head = (f"POST {C} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()

    async def one(i, sem):
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(head + body)
            await writer.drain()
            if i % 4:  # most leave after their first token; some before any
                while b"data: {" not in await reader.readline():
                    pass
            writer.close()

    async def main():
        sem = asyncio.Semaphore(32)
        await asyncio.gather(*(one(i, sem) for i in range(1000)))

    state = server.app.state
    asyncio.run(main())
    st = server.wait_idle(timeout=60)
    assert st["running"] == st["waiting"] == st["unfinished"] == 0
    assert st["free"] == st["blocks"] - 1
    deadline = time.monotonic() + 10
    while state.active or state.metrics._progress or server.llm._streams:
        assert time.monotonic() < deadline, (len(state.active), len(state.metrics._progress),
                                             len(server.llm._streams))
        time.sleep(0.05)


def test_prefix_cache_is_not_shared_across_api_keys(server):
    """The cache is salted per key: another tenant's identical prompt hits
    nothing, so hit counters say nothing about other tenants' prompts."""
    prompt = "A prompt only one tenant has sent, long enough for full blocks. " * 3
    body = {"prompt": prompt, "max_tokens": 2}
    hits = 'jpaged:prefix_cache_hits_total'

    def send(key):
        before = metric(server, hits)
        r = httpx.post(server.url + C, json=body, timeout=30,
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        return metric(server, hits) - before

    assert send(API_KEY) == 0  # first time: nothing cached
    assert send(API_KEY) > 0  # the same tenant hits its own blocks
    assert send("sk-second-key") == 0  # another tenant does not
    assert send("sk-second-key") > 0

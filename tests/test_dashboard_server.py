"""``/dashboard`` and ``/v1/engine/state`` over HTTP: the same authentication
as every route (401 without a key, Basic credentials only on these two
paths), the state during and after real requests, bad ``cells``, and
``--no-dashboard``."""

import argparse
import base64
import threading

import httpx
import pytest

from serve_helpers import API_KEY, MODEL_NAME, FakeEngine, ThreadServer, shared_server

BEARER = {"Authorization": f"Bearer {API_KEY}"}


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def server(llama_dir):
    return shared_server(llama_dir)


@pytest.mark.parametrize("path", ["/dashboard", "/v1/engine/state"])
def test_unauthenticated_is_401_with_a_basic_challenge(server, path):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, basic("x", "sk-wrong"),
                    {"Authorization": "Basic !!!"}, basic("", "")):
        r = httpx.get(server.url + path, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["type"] == "AuthenticationError"
        challenges = r.headers.get_list("www-authenticate")
        assert any(c.startswith("Basic ") for c in challenges), challenges
        assert any(c.startswith("Bearer") for c in challenges), challenges


def test_basic_credentials_only_on_the_dashboard_paths(server):
    r = httpx.get(server.url + "/v1/models", headers=basic("me", API_KEY))
    assert r.status_code == 401
    assert not any(c.startswith("Basic") for c in r.headers.get_list("www-authenticate"))
    for path in ("/dashboard", "/v1/engine/state"):
        assert httpx.get(server.url + path, headers=basic("me", API_KEY)).status_code == 200


def test_page_is_self_contained(server):
    r = httpx.get(server.url + "/dashboard", headers=BEARER)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    page = r.text
    assert "/v1/engine/state" in page and "<canvas" in page
    for external in ("http://", "https://", "//cdn", "@import", "<link rel=\"stylesheet"):
        assert external not in page, external


def test_bad_cells_is_a_400(server):
    for bad in ("0", "x", "70000"):
        r = httpx.get(server.url + f"/v1/engine/state?cells={bad}", headers=BEARER)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "cells" and "cells=" in err["message"]


def test_state_follows_a_workload_and_returns_to_zero(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                           timeout=120)
    prompt = "The same long shared prefix for every request, " * 4
    done = []

    def run(i):
        client.completions.create(model=MODEL_NAME, prompt=prompt + str(i), max_tokens=120,
                                  n=2 if i == 0 else 1, temperature=0.8, seed=i,
                                  extra_body={"ignore_eos": True})
        done.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    busiest = None
    while len(done) < 3:
        s = httpx.get(server.url + "/v1/engine/state?cells=64", headers=BEARER).json()
        assert s["blocks_in_use"] == s["num_blocks"] - s["blocks_free"]
        assert sum(s["grid"]["used"]) + sum(s["grid"]["shared"]) == s["blocks_in_use"]
        assert len(s["requests"]["id"]) == s["num_running"]
        if busiest is None or s["blocks_in_use"] > busiest["blocks_in_use"]:
            busiest = s
    for t in threads:
        t.join(60)
    assert busiest["num_running"] >= 2 and busiest["blocks_shared"] > 0, busiest
    assert sum(busiest["requests"]["shared_blocks"]) >= busiest["blocks_shared"]
    assert busiest["settings"]["block_size"] == busiest["block_size"]
    server.wait_idle()
    s = httpx.get(server.url + "/v1/engine/state", headers=BEARER).json()
    assert s["blocks_in_use"] == s["blocks_shared"] == s["num_running"] == 0
    assert s["requests"]["id"] == [] and max(s["grid"]["owner"]) == -1
    assert s["blocks_cached_free"] > 0  # the shared prefix stays cached
    assert s["output_tokens_per_s"] >= 0 and any(s["throughput_series"])
    assert s["ttft_ms"]["n"] >= 3 and s["ttft_ms"]["p50"] > 0
    assert s["itl_ms"]["n"] > 100 and s["itl_ms"]["p99"] >= s["itl_ms"]["p50"] > 0


def _args(argv):
    from jpaged.config.engine import add_engine_args
    from jpaged.serve.args import add_serve_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    add_serve_args(p)
    return p.parse_args(argv)


def test_no_dashboard_flag():
    from jpaged.engine.async_llm import AsyncLLM
    from jpaged.serve.openai.app import build_app
    from jpaged.serve.openai.state import serve_config_from_args

    assert serve_config_from_args(_args(["--api-key", "k"])).dashboard is True
    cfg = serve_config_from_args(_args(["--api-key", "k", "--no-dashboard"]))
    assert cfg.dashboard is False
    llm = AsyncLLM(FakeEngine())
    srv = ThreadServer(build_app(llm, cfg), llm)
    try:
        for path in ("/dashboard", "/v1/engine/state"):
            r = httpx.get(srv.url + path, headers={"Authorization": "Bearer k"})
            assert r.status_code == 404, r.text
            r = httpx.get(srv.url + path)
            assert r.status_code == 401
            assert not any(c.startswith("Basic") for c in r.headers.get_list("www-authenticate"))
    finally:
        srv.stop()

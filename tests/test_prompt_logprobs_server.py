"""``echo`` + ``logprobs`` on ``/v1/completions`` (the way evaluation
harnesses score text) and vLLM's ``prompt_logprobs`` field on completions and
chat, against transformers' log-softmax of the prompt positions (float32),
streamed and not, with ``max_tokens`` 0 and > 0. The shared test server's
16-token budget cuts the prompt into several prefill chunks."""

import httpx
import numpy as np
import pytest
from serve_helpers import API_KEY, MODEL_NAME, shared_server
from test_prompt_logprobs import ATOL, hf_log_softmax

PROMPT = "The quick brown fox jumps over the lazy dog, then naps under a tall old tree."
H = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(llama_dir):
    return shared_server(llama_dir)


@pytest.fixture(scope="module")
def ref(server, llama_dir):
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=H)
    ids = r.json()["tokens"]
    assert len(ids) > 16, "the prompt must span several prefill chunks"
    return ids, hf_log_softmax(llama_dir, ids)


def post(server, path, body):
    r = httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, headers=H,
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, body):
    """The streamed choice 0: text and the concatenated logprobs lists."""
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", server.url + "/v1/completions", headers=H, timeout=120,
                      json={"model": MODEL_NAME, "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            import json

            for c in json.loads(line[6:])["choices"]:
                text += c["text"]
                for key in lp:
                    lp[key] += (c["logprobs"] or {}).get(key, [])
    return text, lp


def check_prompt_part(lp, ids, ref, k):
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = np.array(lp["token_logprobs"][1:len(ids)], float)
    want = ref[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert all(k <= len(t) <= k + 1 for t in lp["top_logprobs"][1:len(ids)])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_logprobs(server, ref, max_tokens):
    ids, lsm = ref
    body = dict(prompt=PROMPT, echo=True, logprobs=2, max_tokens=max_tokens, temperature=0,
                ignore_eos=True)
    r = post(server, "/v1/completions", body)
    choice, lp = r["choices"][0], r["choices"][0]["logprobs"]
    assert choice["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == len(ids) + max_tokens
    check_prompt_part(lp, ids, lsm, 2)
    assert r["usage"]["completion_tokens"] == max_tokens
    if max_tokens == 0:
        assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    else:  # the generated part equals the same request without echo
        plain = post(server, "/v1/completions", {**body, "echo": False})["choices"][0]
        assert lp["token_logprobs"][len(ids):] == plain["logprobs"]["token_logprobs"]
        assert choice["text"] == PROMPT + plain["text"]
    text, slp = stream(server, body)
    assert text == choice["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert slp[key] == lp[key], key


def test_prompt_logprobs_field(server, ref):
    ids, lsm = ref
    r = post(server, "/v1/completions", dict(prompt=ids, max_tokens=2, prompt_logprobs=3))
    plp = r["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for p in range(1, len(ids)):
        entry = plp[p][str(ids[p])]
        assert abs(entry["logprob"] - lsm[p - 1, ids[p]]) < ATOL
        assert entry["rank"] == int(np.sum(lsm[p - 1] > lsm[p - 1, ids[p]])) + 1
    chat = post(server, "/v1/chat/completions", dict(
        messages=[{"role": "user", "content": PROMPT}], max_tokens=2, prompt_logprobs=1))
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) > len(ids)
    plain = post(server, "/v1/chat/completions", dict(
        messages=[{"role": "user", "content": PROMPT}], max_tokens=2))
    assert plain.get("prompt_logprobs") is None


def test_prompt_logprobs_work_limit(server):
    """Prompt logprobs count against max_request_work like generated ones."""
    st = server.app.state  # the ServerState
    old = st.cfg.max_request_work
    try:
        st.cfg.max_request_work = 50  # 31 prompt tokens x (2 + 2) = 124 entries
        for path, body in (("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 2,
                                                "max_tokens": 0}),
                           ("/v1/chat/completions", {"messages": [
                               {"role": "user", "content": PROMPT}], "prompt_logprobs": 2,
                               "max_tokens": 1})):
            r = httpx.post(server.url + path, json={"model": MODEL_NAME, **body}, headers=H)
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    finally:
        st.cfg.max_request_work = old

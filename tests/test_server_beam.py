"""The server's beam search (vLLM's ``use_beam_search`` with ``n`` as the
width) on /v1/completions and /v1/chat/completions returns the same beams,
best first, as `LLM.beam_search` on the same tiny checkpoint; streaming and
bad beam fields are refused with a 400 in OpenAI's error shape."""

import httpx
import openai
import pytest

from jpaged import LLM, BeamSearchParams
from serve_helpers import API_KEY, ENGINE_KWARGS, MODEL_NAME, shared_server

HDR = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(llama_dir):
    return shared_server(llama_dir)


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(model=llama_dir, **ENGINE_KWARGS)


def _offline_texts(llm, prompt_ids, width, max_tokens, **kw):
    """The generated part of each `LLM.beam_search` sequence, best first."""
    out = llm.beam_search([{"prompt_token_ids": prompt_ids}],
                          BeamSearchParams(beam_width=width, max_tokens=max_tokens, **kw))[0]
    tok = llm.get_tokenizer()
    return [tok.decode(s.tokens[len(prompt_ids):], skip_special_tokens=True)
            for s in out.sequences]


@pytest.mark.parametrize("width,lp", [(2, 1.0), (4, 0.5)])
def test_completions_beam_equals_llm_beam_search(server, client, offline, width, lp):
    prompts = [[5, 6, 7, 8, 9], [40, 41, 300, 12, 99, 7]]
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompts, n=width, max_tokens=8,
        extra_body={"use_beam_search": True, "length_penalty": lp, "early_stopping": True})
    assert len(r.choices) == 2 * width
    for i, p in enumerate(prompts):
        want = _offline_texts(offline, p, width, 8, length_penalty=lp, early_stopping=True)
        got = [c.text for c in sorted(r.choices, key=lambda c: c.index)
               if c.index // width == i]
        assert got == want
    # Distinct hypotheses: a beam search, not n copies of one greedy sequence.
    assert len({c.text for c in r.choices[:width]}) > 1
    assert server.wait_idle()["free"] == server.engine_state()["blocks"] - 1


def test_chat_beam_equals_llm_beam_search(server, client, offline):
    msgs = [{"role": "user", "content": "Translate: the cat sat"}]
    ids = httpx.post(server.url + "/tokenize", json={"messages": msgs}, headers=HDR).json()
    r = client.chat.completions.create(model=MODEL_NAME, messages=msgs, n=3, max_tokens=6,
                                       extra_body={"use_beam_search": True,
                                                   "early_stopping": "never"})
    want = _offline_texts(offline, ids["tokens"], 3, 6, early_stopping="never")
    assert [c.message.content for c in sorted(r.choices, key=lambda c: c.index)] == want


@pytest.mark.parametrize("route,body,param", [
    ("/v1/completions", {"prompt": "x", "n": 2, "stream": True}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2,
                              "stream": True}, "stream"),
    ("/v1/completions", {"prompt": "x", "n": 2, "top_p": 0.5}, "num_beams"),
    ("/v1/completions", {"prompt": "x", "n": 2, "early_stopping": "sometimes"},
     "early_stopping"),
])
def test_beam_refusals_are_openai_400s(server, route, body, param):
    body = {"model": MODEL_NAME, "max_tokens": 4, "use_beam_search": True, **body}
    r = httpx.post(server.url + route, json=body, headers=HDR)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["param"] == param, err

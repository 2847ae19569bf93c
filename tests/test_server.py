"""The server on a real uvicorn (127.0.0.1) and a tiny checkpoint, driven by
the official ``openai`` client: completions and chat, streamed and not."""

import httpx
import openai
import pytest

from serve_helpers import API_KEY, MODEL_NAME, shared_server


@pytest.fixture(scope="module")
def server(llama_dir):
    return shared_server(llama_dir)


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield c
    c.close()


def _tokens(server, text, special=True):
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": special},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_models_and_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    r = httpx.get(server.url + "/version", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.json()["version"]


def test_completion_stream_matches_non_stream(server, client):
    kw = dict(model=MODEL_NAME, prompt="The capital of France is", max_tokens=12,
              temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens == len(_tokens(server, kw["prompt"]))
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(client.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream_matches_non_stream(server, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    full = client.chat.completions.create(model=MODEL_NAME, messages=msgs, temperature=0,
                                          max_completion_tokens=10,
                                          extra_body={"ignore_eos": True})
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 10
    rendered = ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert full.usage.prompt_tokens == len(_tokens(server, rendered, special=False))
    stream = client.chat.completions.create(model=MODEL_NAME, messages=msgs, temperature=0,
                                            max_tokens=10, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10


def test_n2_and_prompt_lists(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon", n=2, max_tokens=5,
                                  temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    r = client.completions.create(model=MODEL_NAME, prompt=["a b", "c d e"], max_tokens=3,
                                  temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    r = client.completions.create(model=MODEL_NAME, prompt=[[5, 6, 7], [8, 9]], max_tokens=3,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 6
    r = client.chat.completions.create(model=MODEL_NAME, n=2, max_tokens=4,
                                       messages=[{"role": "user", "content": "x"}])
    assert sorted(c.index for c in r.choices) == [0, 1]
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, n=2, max_tokens=4, stream=True,
        messages=[{"role": "user", "content": "x"}]))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}


def test_echo_logprobs_and_vllm_fields(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", echo=True, max_tokens=3,
                                  temperature=0)
    assert r.choices[0].text.startswith("Hello")
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", logprobs=2, max_tokens=4,
                                  temperature=0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user",
                                                                    "content": "x"}],
                                       logprobs=True, top_logprobs=3, max_tokens=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    r = client.completions.create(
        model=MODEL_NAME, prompt="Hello", max_tokens=6, temperature=0.8, seed=1,
        extra_body=dict(top_k=5, min_p=0.01, repetition_penalty=1.1, min_tokens=2,
                        stop_token_ids=[3], skip_special_tokens=True,
                        include_stop_str_in_output=False, priority=0, ignore_eos=False))
    assert r.choices[0].finish_reason in ("stop", "length")


def test_typed_errors(server, client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=100000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", suffix="y")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user",
                                                                  "content": "x"}])
    second = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-second-key",
                           max_retries=0)
    assert second.models.list().data


def test_tokenize_detokenize(server):
    h = {"Authorization": f"Bearer {API_KEY}"}
    ids = _tokens(server, "hello world", special=False)
    r = httpx.post(server.url + "/detokenize", json={"tokens": ids}, headers=h)
    assert r.status_code == 200 and r.json()["prompt"] == "hello world"
    r = httpx.post(server.url + "/tokenize", headers=h,
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"]) > 0

"""The gRPC API against a real tiny engine (the one the HTTP tests share, so
REST and gRPC answers can be compared), through a client that grpcio-tools
generates from ``generation.proto`` here, at test time; queue-full, drain and
a dead engine against the fake engine of `serve_helpers`."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpc_client import client_modules
from serve_helpers import API_KEY, MODEL_NAME, FakeEngine, shared_server

AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def client_mod():
    return client_modules()


class LoopThread:
    """An asyncio loop in a daemon thread, for the server side."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def start(llm, auth, **kw):
    from jpaged.serve.grpc.server import start_grpc_server

    lt = LoopThread()
    kw.setdefault("served_model_name", MODEL_NAME)
    handle = lt.run(start_grpc_server(llm, 0, auth, host="127.0.0.1", **kw))
    return lt, handle


@pytest.fixture(scope="module")
def rest(llama_dir):
    return shared_server(llama_dir)


@pytest.fixture(scope="module")
def grpc_srv(rest):
    from jpaged.serve.auth_plugins import APIKeyAuth

    lt, handle = start(rest.llm, APIKeyAuth([API_KEY]), state=rest.app.state)
    yield handle
    lt.run(handle.stop(0))


@pytest.fixture(scope="module")
def channel(grpc_srv):
    ch = grpc.insecure_channel(f"127.0.0.1:{grpc_srv.port}")
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel, client_mod):
    return client_mod[1].GenerationStub(channel)


def request(pb, prompt="The capital of France is", stream=True, **params):
    params.setdefault("max_tokens", 12)
    params.setdefault("temperature", 0.0)
    params.setdefault("ignore_eos", True)
    return pb.GenerateRequest(request_id="r1", prompt=prompt, stream=stream,
                              params=pb.SamplingParams(**params))


def test_greedy_stream_equals_non_stream_and_rest(rest, stub, client_mod):
    pb = client_mod[0]
    msgs = list(stub.Generate(request(pb), metadata=AUTH, timeout=120))
    assert len(msgs) > 1 and all(m.request_id == "r1" for m in msgs)
    text = "".join(c.text for m in msgs for c in m.choices)
    ids = [t for m in msgs for c in m.choices for t in c.token_ids]
    assert msgs[-1].choices[-1].finish_reason == "length"
    (one,) = list(stub.Generate(request(pb, stream=False), metadata=AUTH, timeout=120))
    (choice,) = one.choices
    assert (choice.text, list(choice.token_ids)) == (text, ids) and len(ids) == 12
    assert one.usage.completion_tokens == 12 == msgs[-1].usage.completion_tokens
    r = httpx.post(rest.url + "/v1/completions", timeout=120,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": MODEL_NAME, "prompt": "The capital of France is",
                         "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text
    assert r.json()["usage"]["prompt_tokens"] == one.usage.prompt_tokens
    # Token ids in, the same prompt: the same answer.
    tok = stub.Tokenize(pb.TokenizeRequest(text="The capital of France is"), metadata=AUTH)
    req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=tok.token_ids),
                             params=pb.SamplingParams(max_tokens=12, temperature=0,
                                                      ignore_eos=True))
    (by_ids,) = list(stub.Generate(req, metadata=AUTH, timeout=120))
    assert by_ids.choices[0].text == text and by_ids.request_id.startswith("grpc-")


def test_n_2(stub, client_mod):
    pb = client_mod[0]
    kw = dict(n=2, temperature=1.0, seed=7, max_tokens=6)
    msgs = list(stub.Generate(request(pb, **kw), metadata=AUTH, timeout=120))
    streamed = {0: "", 1: ""}
    for m in msgs:
        for c in m.choices:
            streamed[c.index] += c.text
    (one,) = list(stub.Generate(request(pb, stream=False, **kw), metadata=AUTH, timeout=120))
    assert [c.index for c in one.choices] == [0, 1]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in one.choices)
    assert {c.index: c.text for c in one.choices} == streamed  # seeded: reproducible
    assert one.usage.completion_tokens == 12 == msgs[-1].usage.completion_tokens


def test_tokenize_and_model_info(rest, stub, client_mod):
    pb = client_mod[0]
    tok = stub.Tokenize(pb.TokenizeRequest(text="Hello world"), metadata=AUTH)
    r = httpx.post(rest.url + "/tokenize", json={"prompt": "Hello world"},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert list(tok.token_ids) == r.json()["tokens"] and tok.count == len(tok.token_ids)
    bare = stub.Tokenize(pb.TokenizeRequest(text="Hello world", add_special_tokens=False),
                         metadata=AUTH)
    assert len(bare.token_ids) < len(tok.token_ids)  # the tiny llama adds BOS
    info = stub.ModelInfo(pb.ModelInfoRequest(), metadata=AUTH)
    assert (info.served_model_name, info.max_model_len) == (MODEL_NAME, 512)
    assert info.vocab_size == rest.llm.engine.model_config.vocab_size


def test_health_and_reflection(channel, grpc_srv):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jpaged.v1.Generation"):  # no credentials needed
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = list(refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=AUTH))
    names = {s.name for s in resp.list_services_response.service}
    assert {"jpaged.v1.Generation", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer sk-wrong"),),
                                      (("authorization", API_KEY),)])
def test_unauthenticated(channel, stub, client_mod, metadata):
    pb = client_mod[0]
    calls = [lambda: list(stub.Generate(request(pb), metadata=metadata, timeout=10)),
             lambda: stub.Tokenize(pb.TokenizeRequest(text="x"), metadata=metadata),
             lambda: stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata),
             lambda: list(reflection_pb2_grpc.ServerReflectionStub(channel)
                          .ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                              list_services="")]), metadata=metadata))]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("bad", [dict(prompt=""), dict(temperature=-1.0),
                                 dict(ids=[10 ** 6]), dict(max_tokens=0)])
def test_invalid_argument(stub, client_mod, bad):
    pb = client_mod[0]
    if "ids" in bad:
        req = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=bad["ids"]))
    else:
        req = request(pb, **bad) if "prompt" not in bad else request(pb, prompt="")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, metadata=AUTH, timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details()


def test_cancel_mid_stream_frees_blocks(rest, stub, client_mod):
    pb = client_mod[0]
    call = stub.Generate(request(pb, max_tokens=400), metadata=AUTH, timeout=120)
    next(call), next(call)
    assert rest.engine_state()["running"] == 1
    call.cancel()
    st = rest.wait_idle()
    assert st["running"] == st["waiting"] == st["unfinished"] == 0
    assert st["free"] == st["blocks"] - 1


def test_deadline_aborts_and_frees_blocks(rest, stub, client_mod):
    pb = client_mod[0]
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(request(pb, max_tokens=480, stream=False), metadata=AUTH,
                           timeout=0.25))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    st = rest.wait_idle()
    assert st["unfinished"] == 0 and st["free"] == st["blocks"] - 1


def test_twenty_streams_half_cancelled(rest, grpc_srv, client_mod):
    pb, pb_grpc = client_mod

    async def one(stub, i):
        call = stub.Generate(request(pb, max_tokens=300 if i % 2 else 8), metadata=AUTH)
        got = 0
        async for msg in call:
            got += sum(len(c.token_ids) for c in msg.choices)
            if i % 2 and got >= 2:
                call.cancel()
                return "cancelled"
        return got

    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_srv.port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            return await asyncio.gather(*(one(stub, i) for i in range(20)))

    results = asyncio.run(main())
    assert results[1::2] == ["cancelled"] * 10 and results[0::2] == [8] * 10
    st = rest.wait_idle()
    assert st["running"] == st["waiting"] == st["unfinished"] == 0
    assert st["free"] == st["blocks"] - 1


# ------------------------------------------------------------ fake engine
def _fake(client_mod, **kw):
    from jpaged.engine.async_llm import AsyncLLM

    llm = AsyncLLM(FakeEngine(max_running=1, step_delay=0.02, **kw.pop("engine", {})), **kw)
    lt, handle = start(llm, None)
    ch = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    return llm, lt, handle, ch, client_mod[1].GenerationStub(ch)


def _ids_request(pb, max_tokens, stream=True):
    return pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 2]), stream=stream,
                              params=pb.SamplingParams(max_tokens=max_tokens))


def test_full_queue_and_drain(client_mod):
    pb = client_mod[0]
    llm, lt, handle, ch, stub = _fake(client_mod, max_queue_len=1)
    try:
        running = stub.Generate(_ids_request(pb, 10 ** 6))
        next(running)  # running now
        waiting = stub.Generate(_ids_request(pb, 5))
        deadline = time.monotonic() + 10
        while not llm.call(lambda e: len(e.scheduler.waiting)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(_ids_request(pb, 5)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        handle.draining = True
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(_ids_request(pb, 5)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 5  # the health watcher polls the drain state
        while health.Check(health_pb2.HealthCheckRequest()).status != \
                health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Drain: the endless request is aborted at the deadline, and the server stops.
        lt.run(handle.drain(timeout=0.2))
        assert [c.finish_reason for m in running for c in m.choices][-1:] == ["abort"]
        assert llm.call(lambda e: e.has_unfinished_requests()) is False
        waiting.cancel()
    finally:
        ch.close()
        llm.shutdown()


def test_dead_engine_is_unavailable(client_mod):
    pb = client_mod[0]
    llm, lt, handle, ch, stub = _fake(client_mod, engine=dict(fail_after=3))
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(_ids_request(pb, 50)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(_ids_request(pb, 5)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ch.close()
        lt.run(handle.stop(0))


def test_oidc_guards_grpc(client_mod, tmp_path):
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from jpaged.engine.async_llm import AsyncLLM
    from jpaged.serve.oidc import OIDCAuth

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [dict(jwk, kid="k")]}))
    auth = OIDCAuth("https://iss.test", "jpaged", str(tmp_path / "jwks.json"),
                    required_scope="generate")

    def token(**over):
        now = int(time.time())
        c = dict(dict(iss="https://iss.test", aud="jpaged", sub="u", exp=now + 60,
                      scope="generate"), **over)
        return (("authorization", "Bearer " + jwt.encode(c, key, "RS256",
                                                           headers={"kid": "k"})),)

    pb = client_mod[0]
    llm = AsyncLLM(FakeEngine())
    lt, handle = start(llm, auth)
    ch = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = client_mod[1].GenerationStub(ch)
    try:
        (msg,) = list(stub.Generate(_ids_request(pb, 3, stream=False), metadata=token()))
        assert msg.choices[0].text == "t1 t2 t3"
        for md, code in [(token(exp=int(time.time()) - 600), "UNAUTHENTICATED"),
                         (token(aud="other"), "UNAUTHENTICATED"),
                         ((), "UNAUTHENTICATED"),
                         (token(scope="openid"), "PERMISSION_DENIED")]:
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfo(pb.ModelInfoRequest(), metadata=md)
            assert e.value.code() == getattr(grpc.StatusCode, code)
    finally:
        ch.close()
        lt.run(handle.stop(0))
        llm.shutdown()


def test_prefix_cache_salt_is_the_callers_principal(client_mod):
    from jpaged.engine.async_llm import AsyncLLM
    from jpaged.serve.auth_plugins import APIKeyAuth, principal_of

    class Recording(FakeEngine):
        salts: list = []

        def add_request(self, request_id, prompt, params, priority=0, cache_salt=None):
            self.salts.append(cache_salt)
            return super().add_request(request_id, prompt, params, priority, cache_salt)

    pb = client_mod[0]
    llm = AsyncLLM(Recording())
    lt, handle = start(llm, APIKeyAuth(["k1", "k2"]))
    ch = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    stub = client_mod[1].GenerationStub(ch)
    try:
        for key in ("k1", "k2", "k1"):
            list(stub.Generate(_ids_request(pb, 2), metadata=[("authorization",
                                                                f"Bearer {key}")]))
        assert Recording.salts == [principal_of(b"k1"), principal_of(b"k2"),
                                   principal_of(b"k1")]
    finally:
        ch.close()
        lt.run(handle.stop(0))
        llm.shutdown()

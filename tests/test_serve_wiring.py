"""`jpaged serve` in a subprocess with ``--grpc-port`` and ``--auth oidc``:
HTTP, WebSocket and gRPC on one engine, all behind the same authenticator;
gRPC's greedy text equals the REST endpoint's; /metrics has the device
gauges; SIGTERM lets a gRPC stream in flight finish, refuses new calls, and
the process exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from grpc_client import client_modules
from serve_helpers import ENGINE_KWARGS, free_port, wait_healthy

ISS, AUD = "https://issuer.test", "jpaged"


@pytest.fixture(scope="module")
def served(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wiring")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (tmp / "jwks.json").write_text(json.dumps({"keys": [dict(jwk, kid="k1")]}))
    now = int(time.time())
    token = jwt.encode({"iss": ISS, "aud": AUD, "sub": "alice", "exp": now + 3600,
                        "scope": "generate"}, key, "RS256", headers={"kid": "k1"})
    port, gport = free_port(), free_port()
    cmd = [sys.executable, "-m", "jpaged.cli", "serve", "--model", llama_dir,
           "--port", str(port), "--grpc-port", str(gport), "--served-model-name", "m",
           "--auth", "oidc", "--oidc-issuer", ISS, "--oidc-audience", AUD,
           "--oidc-jwks", str(tmp / "jwks.json"), "--oidc-required-scope", "generate",
           "--shutdown-timeout", "60"]
    for k, v in ENGINE_KWARGS.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "JPAGED_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, [(proc, tmp / "server.log")], 180)
    channel = grpc.insecure_channel(f"127.0.0.1:{gport}")
    yield dict(proc=proc, url=url, port=port, channel=channel, token=token,
               log=tmp / "server.log")
    channel.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _greedy(pb, stream):
    return pb.GenerateRequest(prompt="The capital of France is", stream=stream,
                              params=pb.SamplingParams(max_tokens=12, temperature=0,
                                                       ignore_eos=True))


def test_one_auth_guards_rest_ws_and_grpc(served):
    pb, pb_grpc = client_modules()
    stub = pb_grpc.GenerationStub(served["channel"])
    auth = {"Authorization": f"Bearer {served['token']}"}
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    r = httpx.post(served["url"] + "/v1/completions", json=body, headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    msgs = list(stub.Generate(_greedy(pb, True), timeout=120,
                              metadata=[("authorization", f"Bearer {served['token']}")]))
    assert "".join(c.text for m in msgs for c in m.choices) == r.json()["choices"][0]["text"]
    # No token, or an API key where a JWT is expected: refused everywhere.
    for bad in ({}, {"Authorization": "Bearer sk-some-key"}):
        assert httpx.post(served["url"] + "/v1/completions", json=body, headers=bad,
                          timeout=30).status_code == 401
        with pytest.raises(InvalidStatus):
            with connect(f"ws://127.0.0.1:{served['port']}/v1/stream", additional_headers=bad):
                pass
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfo(pb.ModelInfoRequest(), metadata=list(
                (k.lower(), v) for k, v in bad.items()))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with connect(f"ws://127.0.0.1:{served['port']}/v1/stream", additional_headers=auth) as ws:
        ws.send(json.dumps({"type": "completion.create", "id": 1, "body": body}))
        while (m := json.loads(ws.recv(timeout=60)))["type"] == "delta":
            pass
        assert m["type"] == "done" and m["usage"]["completion_tokens"] == 12
    text = httpx.get(served["url"] + "/metrics", headers=auth, timeout=30).text
    assert "jpaged:device_live_array_bytes{" in text and "jpaged:num_requests_waiting{" in text


def test_sigterm_drains_grpc(served):
    pb, pb_grpc = client_modules()
    stub = pb_grpc.GenerationStub(served["channel"])
    md = [("authorization", f"Bearer {served['token']}")]
    req = pb.GenerateRequest(prompt="Tell me a story", stream=True,
                             params=pb.SamplingParams(max_tokens=450, ignore_eos=True))
    call = stub.Generate(req, metadata=md, timeout=120)
    first = next(call)
    served["proc"].send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(_greedy(pb, False), metadata=md, timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(call)  # the stream in flight runs to its end
    got = sum(len(c.token_ids) for m in [first, *rest] for c in m.choices)
    assert got == 450 and rest[-1].choices[-1].finish_reason == "length"
    assert served["proc"].wait(60) == 0, served["log"].read_text()[-3000:]

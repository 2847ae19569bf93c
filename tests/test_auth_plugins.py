"""Pluggable auth: the API-key and OIDC authenticators behind `AuthMiddleware`,
with tokens made here from locally generated RSA and EC keys, and a
third-party authenticator loaded from a ``jpaged.auth`` entry point."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from jpaged.serve.auth_plugins import (APIKeyAuth, AuthMiddleware, Principal, Refusal,
                                       load_authenticator)
from jpaged.serve.oidc import OIDCAuth

ISS, AUD = "https://issuer.test", "jpaged-api"


@pytest.fixture(scope="module")
def keys():
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "other": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


@pytest.fixture(scope="module")
def jwks_file(keys, tmp_path_factory):
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys["rsa"].public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(keys["ec"].public_key()))
    rsa_jwk.update(kid="rsa-1", use="sig", alg="RS256")
    ec_jwk.update(kid="ec-1", use="sig")
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}))
    return str(path)


def claims(**over):
    now = int(time.time())
    c = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 300,
         "scope": "openid generate"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def rs256(keys, kid="rsa-1", key="rsa", **over):
    return jwt.encode(claims(**over), keys[key], algorithm="RS256", headers={"kid": kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def app_with(auth) -> TestClient:
    async def whoami(request):
        p = request.scope["jpaged.auth"]
        assert request.scope["jpaged.principal"] == p.subject
        return JSONResponse({"sub": p.subject, "scopes": sorted(p.scopes)})

    async def health(request):
        return JSONResponse({})

    async def ws(websocket):
        await websocket.accept()
        await websocket.send_json({"sub": websocket.scope["jpaged.principal"]})
        await websocket.close()

    app = Starlette(routes=[Route("/whoami", whoami), Route("/health", health),
                            WebSocketRoute("/ws", ws)])
    return TestClient(AuthMiddleware(app, auth))


@pytest.fixture(scope="module")
def oidc_client(jwks_file):
    return app_with(OIDCAuth(ISS, AUD, jwks_file, leeway=30))


def get(client, token):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return client.get("/whoami", headers=headers)


def test_oidc_accepts_rs256_and_es256(oidc_client, keys):
    r = get(oidc_client, rs256(keys))
    assert r.status_code == 200 and r.json() == {"sub": "alice",
                                                 "scopes": ["generate", "openid"]}
    tok = jwt.encode(claims(sub="bob"), keys["ec"], algorithm="ES256",
                     headers={"kid": "ec-1"})
    assert get(oidc_client, tok).json()["sub"] == "bob"
    # Within the leeway (30 s) an just-expired token still passes.
    assert get(oidc_client, rs256(keys, exp=int(time.time()) - 10)).status_code == 200


def _hs256_with_public_key(keys) -> str:
    pem = keys["rsa"].public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def _alg_none(keys) -> str:
    head = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
    return f"{head}.{b64(json.dumps(claims()).encode())}."


def _tampered(keys) -> str:
    head, _, sig = rs256(keys).split(".")
    return f"{head}.{b64(json.dumps(claims(sub='mallory')).encode())}.{sig}"


REFUSED = {
    "expired": lambda k: rs256(k, exp=int(time.time()) - 120),
    "wrong audience": lambda k: rs256(k, aud="someone-else"),
    "wrong issuer": lambda k: rs256(k, iss="https://evil.test"),
    "tampered": _tampered,
    "alg none": _alg_none,
    "hs256 with public key": _hs256_with_public_key,
    "unknown signer": lambda k: rs256(k, key="other"),
    "unknown kid": lambda k: rs256(k, kid="nope"),
    "not yet valid": lambda k: rs256(k, nbf=int(time.time()) + 600),
    "no exp": lambda k: rs256(k, exp=None),
    "not a jwt": lambda k: "sk-not-a-token",
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_oidc_refuses_with_401(oidc_client, keys, case):
    r = get(oidc_client, REFUSED[case](keys))
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_token"
    assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    if case in ("alg none", "hs256 with public key"):
        # Refused on the algorithm itself, before any key is tried with it.
        assert "is not accepted" in r.json()["error"]["message"]


def test_oidc_required_scope(jwks_file, keys):
    client = app_with(OIDCAuth(ISS, AUD, jwks_file, required_scope="generate"))
    assert get(client, rs256(keys)).status_code == 200
    assert get(client, rs256(keys, scope=None, scp=["generate"])).status_code == 200
    r = get(client, rs256(keys, scope="openid"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"


def test_oidc_picks_up_a_rotated_key_file(tmp_path, keys):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": []}))
    auth = OIDCAuth(ISS, AUD, str(path))
    scope = {"type": "http", "headers": [(b"authorization",
                                          f"Bearer {rs256(keys, key='other')}".encode())]}
    assert isinstance(auth.authenticate(scope), Refusal)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys["other"].public_key()))
    jwk["kid"] = "rsa-1"
    path.write_text(json.dumps({"keys": [jwk]}))
    import os

    os.utime(path, (time.time() + 5, time.time() + 5))  # a new mtime on coarse clocks
    assert isinstance(auth.authenticate(scope), Principal)


def test_oidc_jwks_from_a_url_with_rotation(keys):
    import http.server
    import threading

    served = {"keys": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(served).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        auth = OIDCAuth(ISS, AUD, f"http://127.0.0.1:{httpd.server_port}/jwks")
        auth.jwks.refresh_cooldown = 0.0
        client = app_with(auth)
        assert get(client, rs256(keys)).status_code == 401  # no keys yet
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys["rsa"].public_key()))
        served["keys"] = [dict(jwk, kid="rsa-1")]
        assert get(client, rs256(keys)).status_code == 200  # unknown kid: fetched again
        auth.jwks.refresh_cooldown = 3600.0
        assert get(client, rs256(keys, kid="rsa-2")).status_code == 401
    finally:
        httpd.shutdown()


def test_middleware_guards_http_and_websocket_but_not_health(oidc_client, keys):
    assert get(oidc_client, None).status_code == 401
    assert oidc_client.get("/health").status_code == 200
    with pytest.raises(WebSocketDisconnect):
        with oidc_client.websocket_connect("/ws"):
            pass
    with oidc_client.websocket_connect(
            "/ws", headers={"Authorization": f"Bearer {rs256(keys)}"}) as ws:
        assert ws.receive_json() == {"sub": "alice"}


def test_api_key_authenticator():
    client = app_with(APIKeyAuth(["k1", "k2"]))
    subjects = {get(client, k).json()["sub"] for k in ("k1", "k2", "k1")}
    assert len(subjects) == 2 and not any("k1" in s or "k2" in s for s in subjects)
    assert get(client, "k3").status_code == 401
    assert get(client, None).status_code == 401
    two = [("authorization", "Bearer k1"), ("authorization", "Bearer k1")]
    assert client.get("/whoami", headers=two).status_code == 401
    assert client.get("/whoami", headers={"Authorization": "Basic k1"}).status_code == 401
    with pytest.raises(ValueError, match="api_keys"):
        APIKeyAuth([])


def test_load_by_name(jwks_file):
    opts = {"api_keys": ["k"], "oidc_issuer": ISS, "oidc_audience": AUD,
            "oidc_jwks": jwks_file}
    assert isinstance(load_authenticator("api-key", opts), APIKeyAuth)
    assert isinstance(load_authenticator("oidc", opts), OIDCAuth)
    with pytest.raises(ValueError, match="auth='nope'"):
        load_authenticator("nope", opts)
    with pytest.raises(ValueError, match="oidc_audience"):
        load_authenticator("oidc", dict(opts, oidc_audience=None))
    with pytest.raises(ValueError, match="oidc_jwks"):
        load_authenticator("oidc", dict(opts, oidc_jwks="/no/such/file"))


def test_third_party_plugin_from_entry_point(tmp_path, monkeypatch):
    # An installed distribution, as pip would leave it: a module and its
    # dist-info with an entry point in the jpaged.auth group.
    (tmp_path / "header_auth.py").write_text(
        "from jpaged.serve.auth_plugins import Principal, Refusal, header\n"
        "class HeaderAuth:\n"
        "    def __init__(self, options):\n"
        "        self.user = options['expected_user'].encode()\n"
        "    async def authenticate(self, scope):\n"
        "        if header(scope, b'x-user') == [self.user]:\n"
        "            return Principal(subject=self.user.decode())\n"
        "        return Refusal('who are you?')\n"
        "class Broken:\n"
        "    def __init__(self, options):\n"
        "        pass\n"
        "    def authenticate(self, scope):\n"
        "        return True\n")
    dist = tmp_path / "header_auth-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: header-auth\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[jpaged.auth]\nheader = header_auth:HeaderAuth\nbroken = header_auth:Broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "header_auth", raising=False)
    client = app_with(load_authenticator("header", {"expected_user": "carol"}))
    assert client.get("/whoami", headers={"x-user": "carol"}).json()["sub"] == "carol"
    assert client.get("/whoami", headers={"x-user": "dave"}).status_code == 401
    # A plugin that answers neither a Principal nor a Refusal fails closed.
    broken = app_with(load_authenticator("broken", {}))
    assert broken.get("/whoami").status_code == 500


def test_serve_flags_select_the_authenticator(jwks_file):
    import argparse

    from jpaged.serve.args import add_serve_args
    from jpaged.serve.auth_plugins import authenticator_from_args

    p = argparse.ArgumentParser()
    add_serve_args(p)
    assert authenticator_from_args(p.parse_args([]), []) is None
    assert isinstance(authenticator_from_args(p.parse_args([]), ["k"]), APIKeyAuth)
    args = p.parse_args(["--auth", "oidc", "--oidc-issuer", ISS, "--oidc-audience", AUD,
                         "--oidc-jwks", jwks_file, "--oidc-required-scope", "generate",
                         "--grpc-port", "50051"])
    auth = authenticator_from_args(args, ["ignored-key"])
    assert isinstance(auth, OIDCAuth) and auth.required == {"generate"}
    assert args.grpc_port == 50051
    with pytest.raises(ValueError, match="oidc_issuer"):
        authenticator_from_args(p.parse_args(["--auth", "oidc"]), [])

"""Pluggable authentication: one small interface for HTTP, WebSocket and gRPC.

An authenticator is any object with ``authenticate(scope) -> Principal |
Refusal`` (the result may also be awaitable). ``scope`` is an ASGI scope, or
for gRPC the same shape built from the call: ``{"type": "grpc", "path":
"/jpaged.v1.Generation/Generate", "headers": [(b"authorization", b"Bearer
..."), ...]}`` with lower-case header names. Built in: ``api-key`` (the
``--api-key`` list, compared in constant time) and ``oidc`` (OAuth2/OIDC
bearer JWTs, `jpaged.serve.oidc`). Others load by name from the entry point
group ``jpaged.auth``: the entry point is a factory called with the server's
options (a mapping with ``api_keys``, ``oidc_issuer``, ``oidc_audience``,
``oidc_jwks``, ``oidc_required_scope``, ...) that returns an authenticator.
`AuthMiddleware` guards an ASGI app with any of them.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "jpaged.auth"
PRINCIPAL = "jpaged.principal"  # scope key: the subject string
PRINCIPAL_OBJECT = "jpaged.auth"  # scope key: the `Principal`
PUBLIC_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a subject, granted scopes, the raw claims."""

    subject: str
    scopes: frozenset[str] = frozenset()
    claims: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: 401 (no or bad credentials) or 403 (not allowed)."""

    message: str
    status: int = 401
    code: str = "invalid_api_key"
    # RFC 6750 error for the WWW-Authenticate header (invalid_token, insufficient_scope).
    bearer_error: str | None = None


def principal_of(key: bytes) -> str:
    """A stable name for an API key that does not reveal it."""
    return hashlib.sha256(b"jpaged-principal\0" + key).hexdigest()


def header(scope, name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower case) in an ASGI or gRPC scope."""
    return [v for k, v in scope.get("headers", ()) if k.lower() == name]


def bearer_token(scope) -> bytes | Refusal:
    """The token of the one ``Authorization: Bearer`` header, or a refusal."""
    values = header(scope, b"authorization")
    if len(values) != 1:
        return Refusal("Missing credentials; send 'Authorization: Bearer <token>'.")
    scheme, _, token = values[0].partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return Refusal("Malformed credentials; send 'Authorization: Bearer <token>'.")
    return token


class APIKeyAuth:
    """Accept ``Authorization: Bearer <key>`` for any of the configured keys.

    Every key is compared with `hmac.compare_digest`, all of them every time,
    so the time taken says nothing about which key nearly matched. The
    subject is a digest of the key, a stable tenant name that does not
    reveal it.
    """

    name = "api-key"

    def __init__(self, api_keys):
        self.keys = [k.encode() if isinstance(k, str) else bytes(k) for k in api_keys if k]
        if not self.keys:
            raise ValueError("api_keys=[] is empty: the api-key authenticator needs a key")
        self.subjects = [principal_of(k) for k in self.keys]

    def authenticate(self, scope) -> Principal | Refusal:
        token = bearer_token(scope)
        if isinstance(token, Refusal):
            return token
        index = -1
        for i, key in enumerate(self.keys):  # no early exit: constant time over the list
            if hmac.compare_digest(token, key):
                index = i
        if index < 0:
            return Refusal("Invalid API key.")
        return Principal(subject=self.subjects[index])


def _api_key_factory(options: Mapping):
    return APIKeyAuth(options.get("api_keys") or [])


def _oidc_factory(options: Mapping):
    from jpaged.serve.oidc import OIDCAuth

    return OIDCAuth.from_options(options)


BUILTIN = {"api-key": _api_key_factory, "oidc": _oidc_factory}


def available() -> list[str]:
    """Names ``--auth`` accepts: the built-ins and installed entry points."""
    return sorted(set(BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_authenticator(name: str, options: Mapping):
    """Build the authenticator called ``name`` from the server's ``options``."""
    factory = BUILTIN.get(name)
    if factory is None:
        eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not eps:
            raise ValueError(f"auth={name!r} is unknown; available: {', '.join(available())}")
        factory = eps[0].load()
    auth = factory(options)
    if not callable(getattr(auth, "authenticate", None)):
        raise ValueError(f"auth={name!r}: its factory returned {auth!r}, which has no "
                         "authenticate(scope) method")
    return auth


async def authenticate(auth, scope) -> Principal | Refusal:
    """Run ``auth.authenticate`` (sync or async) and check what it returned."""
    result = auth.authenticate(scope)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, (Principal, Refusal)):
        # A plugin bug must fail closed, never let the request through.
        return Refusal("authentication failed", status=500, code="auth_error")
    return result


def refusal_body(refusal: Refusal) -> bytes:
    """OpenAI's error shape for a refusal."""
    kind = "AuthenticationError" if refusal.status == 401 else "PermissionDeniedError"
    return json.dumps({"error": {"message": refusal.message, "type": kind, "param": None,
                                 "code": refusal.code}}).encode()


class AuthMiddleware:
    """Guard every HTTP and WebSocket route of an ASGI app with ``auth``.

    Only exact ``public_paths`` skip the check (``scope["path"]``, never the
    Host header). A refused HTTP request gets the refusal's status with
    OpenAI's error body and a ``WWW-Authenticate: Bearer`` header; a refused
    WebSocket is closed before it is accepted (HTTP 403 to the client). The
    routes find the principal's subject (a string naming the tenant, used to
    salt the prefix cache) in ``scope["jpaged.principal"]`` and the whole
    `Principal` in ``scope["jpaged.auth"]``.
    """

    def __init__(self, app, auth, public_paths=PUBLIC_PATHS):
        self.app, self.auth, self.public = app, auth, frozenset(public_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.auth is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("path") in self.public:
            return await self.app(scope, receive, send)
        result = await authenticate(self.auth, scope)
        if isinstance(result, Principal):
            scope[PRINCIPAL] = result.subject
            scope[PRINCIPAL_OBJECT] = result
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = refusal_body(result)
        challenge = b"Bearer"
        if result.bearer_error:
            challenge += b' error="' + result.bearer_error.encode() + b'"'
        await send({"type": "http.response.start", "status": result.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge)]})
        await send({"type": "http.response.body", "body": body})


def authenticator_from_args(args, api_keys: list[str]):
    """The authenticator ``jpaged serve`` flags ask for, or None (no auth:
    neither ``--auth`` nor an API key was given)."""
    name = getattr(args, "auth", None) or ("api-key" if api_keys else None)
    if name is None:
        return None
    options = dict(vars(args), api_keys=list(api_keys))  # plugins see every flag
    return load_authenticator(name, options)

"""API-key middleware (pure ASGI).

The route is read from ``scope["path"]`` (the request target, never the Host
header), and only exact allowlisted paths are public: ``//health``,
``/health/`` or ``/v1/../health`` all need a key. Every configured key is
compared with `hmac.compare_digest`, all of them every time, so the time
taken says nothing about which key nearly matched.

An authorized request carries its principal in ``scope["jpaged.principal"]``:
a SHA-256 digest of its key (never the key), which the routes use to salt
the prefix cache per tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import json

PRINCIPAL = "jpaged.principal"

PUBLIC_PATHS = frozenset({"/health"})


def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()


class APIKeyMiddleware:
    """Refuse HTTP requests without ``Authorization: Bearer <key>`` (401)."""

    def __init__(self, app, api_keys: list[str], public_paths=PUBLIC_PATHS):
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.principals = [principal_of(k) for k in self.keys]
        self.public = frozenset(public_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" or not self.keys:
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("path") in self.public:
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            who = self._principal(scope)
            if who is not None:
                scope[PRINCIPAL] = who
                return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = _error_body("Invalid or missing API key; send 'Authorization: Bearer <key>'.",
                           "invalid_api_key")
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _principal(self, scope) -> str | None:
        """The principal of the request's key, or None if it has no valid key."""
        values = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
        if len(values) != 1:
            return None
        scheme, _, token = values[0].partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip()
        # No early exit: constant time over the key list.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return self.principals[matches.index(True)] if any(matches) else None


def principal_of(key: bytes) -> str:
    """A stable name for an API key that does not reveal it."""
    return hashlib.sha256(b"jpaged-principal\0" + key).hexdigest()

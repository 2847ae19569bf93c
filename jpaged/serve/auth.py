"""API-key middleware (pure ASGI).

The route is read from ``scope["path"]`` (the request target, never the Host
header), and only exact allowlisted paths are public: ``//health``,
``/health/`` or ``/v1/../health`` all need a key. Every configured key is
compared with `hmac.compare_digest`, all of them every time, so the time
taken says nothing about which key nearly matched.
"""

from __future__ import annotations

import hmac
import json

PUBLIC_PATHS = frozenset({"/health"})


def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()


class APIKeyMiddleware:
    """Refuse HTTP requests without ``Authorization: Bearer <key>`` (401)."""

    def __init__(self, app, api_keys: list[str], public_paths=PUBLIC_PATHS):
        self.app = app
        self.keys = [k.encode() for k in api_keys if k]
        self.public = frozenset(public_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" or not self.keys:
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("path") in self.public:
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and self._authorized(scope):
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

    def _authorized(self, scope) -> bool:
        values = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        ok = False
        for key in self.keys:  # no early exit: constant time over the key list
            ok |= hmac.compare_digest(token, key)
        return ok

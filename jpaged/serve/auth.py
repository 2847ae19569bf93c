"""API keys, as the ``api-key`` authenticator of `jpaged.serve.auth_plugins`.

`APIKeyMiddleware` is `AuthMiddleware` with `APIKeyAuth` over a key list (and
no check at all for an empty list). The route is read from ``scope["path"]``
(the request target, never the Host header), and only exact allowlisted
paths are public: ``//health``, ``/health/`` or ``/v1/../health`` all need a
key. An authorized request carries its principal in
``scope["jpaged.principal"]``: a SHA-256 digest of its key (never the key),
which the routes use to salt the prefix cache per tenant.
"""

from __future__ import annotations

from jpaged.serve.auth_plugins import (PRINCIPAL, PUBLIC_PATHS, APIKeyAuth, AuthMiddleware,
                                       principal_of)

__all__ = ["APIKeyMiddleware", "PRINCIPAL", "PUBLIC_PATHS", "principal_of"]


class APIKeyMiddleware(AuthMiddleware):
    """Refuse requests without ``Authorization: Bearer <key>`` (401)."""

    def __init__(self, app, api_keys: list[str], public_paths=PUBLIC_PATHS):
        keys = [k for k in api_keys if k]
        super().__init__(app, APIKeyAuth(keys) if keys else None, public_paths)

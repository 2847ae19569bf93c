"""OAuth2/OIDC bearer tokens: JWTs checked against an issuer's JWKS (PyJWT).

`OIDCAuth` is the ``oidc`` authenticator of `jpaged.serve.auth_plugins`. A
token is accepted only when its header names RS256 or ES256 (never ``none``,
never an HMAC algorithm, so a token "signed" with the public key as an HMAC
secret is refused before any key is looked at), its signature verifies with a
key of the matching type from the JWKS (by ``kid``), ``iss`` and ``aud`` match,
``exp`` is present and not past and ``nbf`` (if present) is reached, both with
a small leeway, and, if configured, every required scope is granted (``scope``
as a space-separated string or ``scp`` as a list). The JWKS comes from a file
(re-read when it changes) or an http(s) URL (fetched at start and again, at
most once per ``refresh_cooldown`` seconds, when a token names an unknown
``kid``, so a key rotation is picked up).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Mapping

import jwt

from jpaged.serve.auth_plugins import Principal, Refusal, bearer_token

logger = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "ES256")
# The JWK a signature algorithm needs: key type and, for EC, the curve.
_KEY_FOR_ALG = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}


class JWKS:
    """The issuer's signing keys, from a file path or an http(s) URL."""

    def __init__(self, source: str, refresh_cooldown: float = 60.0, timeout: float = 5.0):
        self.source, self.refresh_cooldown, self.timeout = source, refresh_cooldown, timeout
        self.is_url = source.startswith(("https://", "http://"))
        if not self.is_url and not os.path.isfile(source):
            raise ValueError(f"oidc_jwks={source!r} is neither a file nor an http(s) URL")
        self._lock = threading.Lock()
        self._keys: list[dict] = []
        self._stamp = None  # file mtime, or time of the last fetch
        self._load()

    def _read(self) -> dict:
        if self.is_url:
            req = urllib.request.Request(self.source, headers={"Accept": "application/json"})
            with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310
                return json.loads(r.read(1 << 20))
        with open(self.source) as f:
            return json.load(f)

    def _load(self) -> None:
        try:
            data = self._read()
            keys = data["keys"]
            if not isinstance(keys, list):
                raise TypeError("'keys' is not a list")
        except Exception as e:  # noqa: BLE001 - reported with the source named
            raise ValueError(f"oidc_jwks={self.source!r} is not a usable JWKS: {e}") from None
        # Signing keys only; a key marked for encryption must not verify tokens.
        self._keys = [k for k in keys if isinstance(k, dict) and k.get("use", "sig") == "sig"]
        self._stamp = time.monotonic() if self.is_url else os.stat(self.source).st_mtime

    def _maybe_refresh(self) -> None:
        with self._lock:
            if self.is_url:
                if time.monotonic() - self._stamp < self.refresh_cooldown:
                    return
            elif os.stat(self.source).st_mtime == self._stamp:
                return
            try:
                self._load()
            except ValueError as e:
                logger.warning("keeping the previous JWKS: %s", e)
                if self.is_url:
                    self._stamp = time.monotonic()  # do not retry on every request

    def candidates(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        """Keys that may have signed a token with this ``kid`` and ``alg``."""
        found = self._match(kid, alg)
        if not found or not self.is_url:
            self._maybe_refresh()
            found = self._match(kid, alg)
        return found

    def _match(self, kid, alg) -> list[jwt.PyJWK]:
        kty, crv = _KEY_FOR_ALG[alg]
        out = []
        for k in self._keys:
            if kid is not None and k.get("kid") != kid:
                continue
            if k.get("kty") != kty or (crv and k.get("crv") != crv):
                continue
            if k.get("alg") not in (None, alg):
                continue
            try:
                out.append(jwt.PyJWK(k, algorithm=alg))
            except jwt.PyJWKError as e:
                logger.warning("skipping unusable JWK kid=%r: %s", k.get("kid"), e)
        return out


def _scopes(claims: Mapping) -> frozenset[str]:
    raw = claims.get("scope", claims.get("scp", ""))
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list):
        return frozenset(s for s in raw if isinstance(s, str))
    return frozenset()


def _invalid(message: str) -> Refusal:
    return Refusal(message, code="invalid_token", bearer_error="invalid_token")


class OIDCAuth:
    """Validate ``Authorization: Bearer <JWT>`` against one issuer.

    Args:
        issuer: the exact ``iss`` expected.
        audience: the ``aud`` expected (the token's may be a list holding it).
        jwks: a `JWKS`, or its file path or URL.
        required_scope: space-separated scopes that must all be granted.
        leeway: seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
    """

    name = "oidc"

    def __init__(self, issuer: str, audience: str, jwks, required_scope: str | None = None,
                 leeway: float = 30.0, algorithms=ALGORITHMS):
        if not issuer:
            raise ValueError(f"oidc_issuer={issuer!r} is required")
        if not audience:
            raise ValueError(f"oidc_audience={audience!r} is required")
        bad = [a for a in algorithms if a not in _KEY_FOR_ALG]
        if bad:
            raise ValueError(f"algorithms={bad!r}: only {list(_KEY_FOR_ALG)} are supported")
        if not 0 <= leeway <= 300:
            raise ValueError(f"leeway={leeway} must be between 0 and 300 seconds")
        self.issuer, self.audience, self.leeway = issuer, audience, leeway
        self.algorithms = tuple(algorithms)
        self.jwks = jwks if isinstance(jwks, JWKS) else JWKS(jwks or "")
        self.required = frozenset((required_scope or "").split())

    @classmethod
    def from_options(cls, options: Mapping) -> "OIDCAuth":
        return cls(options.get("oidc_issuer"), options.get("oidc_audience"),
                   options.get("oidc_jwks"), options.get("oidc_required_scope"),
                   float(options.get("oidc_leeway", 30.0)))

    def authenticate(self, scope):
        """`check` (see the class doc); awaitable for a JWKS URL, whose refresh
        may wait on the network and so runs off the event loop."""
        if self.jwks.is_url:
            return asyncio.to_thread(self.check, scope)
        return self.check(scope)

    def check(self, scope) -> Principal | Refusal:
        token = bearer_token(scope)
        if isinstance(token, Refusal):
            return token
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return _invalid("The bearer token is not a JWT.")
        alg = header.get("alg")
        if alg not in self.algorithms:  # none, HS256, ... refused before any key is used
            return _invalid(f"Token algorithm {str(alg)[:20]!r} is not accepted.")
        kid = header.get("kid")
        keys = self.jwks.candidates(kid if isinstance(kid, str) else None, alg)
        if not keys:
            return _invalid("No signing key of the issuer matches the token.")
        claims = None
        for key in keys:
            try:
                claims = jwt.decode(
                    token, key.key, algorithms=[alg], audience=self.audience,
                    issuer=self.issuer, leeway=self.leeway,
                    options={"require": ["exp", "iss", "aud"]})
                break
            except jwt.InvalidSignatureError:
                continue  # another key with the same kid (or none) may match
            except jwt.ExpiredSignatureError:
                return _invalid("The token has expired.")
            except jwt.ImmatureSignatureError:
                return _invalid("The token is not valid yet (nbf/iat).")
            except jwt.InvalidAudienceError:
                return _invalid("The token is not meant for this audience.")
            except jwt.InvalidIssuerError:
                return _invalid("The token comes from another issuer.")
            except jwt.InvalidTokenError as e:
                return _invalid(f"Invalid token: {str(e)[:200]}")
        if claims is None:
            return _invalid("The token signature does not verify.")
        granted = _scopes(claims)
        if not self.required <= granted:
            missing = " ".join(sorted(self.required - granted))
            return Refusal(f"The token lacks the required scope: {missing}.", status=403,
                           code="insufficient_scope", bearer_error="insufficient_scope")
        return Principal(subject=str(claims.get("sub", "")), scopes=granted, claims=claims)

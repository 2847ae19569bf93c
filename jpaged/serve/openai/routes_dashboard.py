"""The live dashboard: ``GET /dashboard`` (one self-contained HTML page whose
Content-Security-Policy lets it reach nothing but its own origin) and ``GET
/v1/engine/state`` (the JSON it polls; ``?cells=N``, 1..65536, default 4096,
sizes the KV grid), behind the server's authentication. The state is
`jpaged.engine.engine_state.engine_state` plus the recent rates and
latencies of `DashboardStats`, both read in the engine thread by one queued
`AsyncLLM.call` made from a worker thread (the event loop never waits on a
step), and encoded as JSON in that worker thread (the engine never does).
`BrowserAuth` lets a browser log in to these two paths with HTTP Basic.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from functools import lru_cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jpaged.engine.async_llm import EngineDeadError
from jpaged.engine.engine_state import DEFAULT_CELLS, check_cells, engine_state, to_json
from jpaged.serve.dashboard_stats import DashboardStats
from jpaged.serve.openai.errors import error_response

PATHS = frozenset({"/dashboard", "/v1/engine/state"})
_STATE_TIMEOUT_S = 10.0
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")
_NO_STORE = {"Cache-Control": "no-store"}


@lru_cache(maxsize=1)
def page() -> bytes:
    """The dashboard's HTML (package data next to this module)."""
    return resources.files(__package__).joinpath("dashboard.html").read_bytes()


def routes(llm) -> list[Route]:
    """The two routes, and their stat logger added to ``llm``."""
    stats = DashboardStats()
    llm.stat_loggers.append(stats)

    async def dashboard(request: Request):
        return Response(page(), media_type="text/html; charset=utf-8", headers={
            **_NO_STORE, "Content-Security-Policy": _CSP, "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff"})

    async def state(request: Request):
        raw = request.query_params.get("cells", DEFAULT_CELLS)
        try:
            cells = check_cells(raw)
        except ValueError as e:
            return error_response(400, str(e), "cells")

        def snapshot(engine) -> dict:  # in the engine thread
            return {**engine_state(engine, cells), **stats.summary()}

        def read() -> bytes:  # in a worker thread: the engine never encodes
            return to_json(llm.call(snapshot, _STATE_TIMEOUT_S))

        if not llm.is_running:
            return error_response(503, f"engine is not running: {llm.errored!r}")
        try:
            body = await asyncio.to_thread(read)
        except EngineDeadError as e:
            return error_response(503, str(e))
        except TimeoutError:
            return error_response(503, "the engine did not answer in time",
                                  headers={"Retry-After": "1"})
        return Response(body, media_type="application/json", headers=_NO_STORE)

    return [Route("/dashboard", dashboard, methods=["GET"]),
            Route("/v1/engine/state", state, methods=["GET"])]


def _basic_as_bearer(headers: list) -> list:
    """``Authorization: Basic b64(user:token)`` becomes ``Bearer token``."""
    out = []
    for k, v in headers:
        if k.lower() == b"authorization" and v[:6].lower() == b"basic ":
            try:
                _, sep, token = base64.b64decode(v[6:].strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                sep = b""
            if sep and token:
                v = b"Bearer " + token
        out.append((k, v))
    return out


class BrowserAuth:
    """HTTP Basic credentials for the dashboard's paths.

    A browser cannot add ``Authorization: Bearer`` to a page it navigates
    to, so on ``paths`` only this takes Basic credentials whose password is
    the bearer token (the API key; the user name is ignored), passes them on
    to the authenticator as ``Bearer``, and adds a ``Basic`` challenge to the
    401s: the browser asks for the key once, then sends it with the page's
    own requests. Elsewhere Basic credentials are refused as before.
    """

    def __init__(self, app, paths=PATHS):
        self.app, self.paths = app, frozenset(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        scope = dict(scope, headers=_basic_as_bearer(scope.get("headers", [])))

        async def challenge(message):
            if message["type"] == "http.response.start" and message["status"] == 401:
                message = dict(message, headers=[
                    *message.get("headers", []),
                    (b"www-authenticate", b'Basic realm="jpaged", charset="UTF-8"')])
            await send(message)

        return await self.app(scope, receive, challenge)

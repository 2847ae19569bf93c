"""The OpenAI-compatible HTTP server: a Starlette app on an `AsyncLLM`.

The life of a request:

1. `AuthMiddleware` asks the configured authenticator (API keys, OIDC or a
   plugin; route from ``scope["path"]``), then `DrainMiddleware` refuses new
   generation work with 503 while the server is shutting down and counts the
   requests in flight. WebSocket streams (``/v1/stream``, `routes_ws`) go
   through the same routes and the same authenticator.
2. The route reads the body under ``max_request_bytes`` and validates it with
   the pydantic models of `protocol`; any failure is a 400 in OpenAI's error
   shape (never 422). Unknown fields are logged and ignored.
3. Prompts are rendered (chat template, transformers' sandbox) and tokenized
   on a worker thread, then submitted to `AsyncLLM`; the engine's
   `ValueError`s become 400s, a full waiting queue a 503 with Retry-After.
4. Non-streaming requests wait for the final output while watching for
   ``http.disconnect``; streaming ones are sent as Server-Sent Events by
   `SSEResponse`, which also watches for the disconnect. Either way a client
   that goes away aborts its requests, and the engine frees their blocks.
5. On SIGTERM the server answers new work with 503 (gRPC: UNAVAILABLE),
   waits up to ``shutdown_timeout`` for requests in flight (HTTP, WebSocket
   and gRPC alike), aborts the rest, and exits; a second SIGTERM (or Ctrl-C)
   aborts them at once. Either way the engine loop is shut down before the
   process exits. With ``grpc_port`` set, `jpaged.serve.grpc` serves the
   gRPC API on the same engine, state and authenticator.

Tested end to end with uvicorn on 127.0.0.1 and the official ``openai``
client (tests/test_server*.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route, WebSocketRoute

from jpaged.engine.async_llm import AsyncLLM, EngineDeadError
from jpaged.serve.auth_plugins import APIKeyAuth, AuthMiddleware
from jpaged.serve.device_metrics import DeviceCollector
from jpaged.serve.http import uvicorn_config
from jpaged.serve.logsafe import get_logger
from jpaged.serve.metrics import ServerMetrics
from jpaged.serve.openai import routes_dashboard as dashboard
from jpaged.serve.openai import routes_misc as misc
from jpaged.serve.openai.errors import APIError, error_response, param_of
from jpaged.serve.openai.routes_chat import chat_completions
from jpaged.serve.openai.routes_completions import completions
from jpaged.serve.openai.routes_ws import stream_ws
from jpaged.serve.openai.state import ServeConfig, ServerState, serve_config_from_args

logger = get_logger(__name__)


def _wrap(handler):
    async def endpoint(request: Request):
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e.status, e.message, e.param, e.headers)
        except EngineDeadError as e:
            return error_response(503, str(e))
        except ValueError as e:
            return error_response(400, str(e), param_of(str(e)))
    return endpoint


async def _http_error(request: Request, exc: HTTPException):
    return error_response(exc.status_code, exc.detail or "error", headers=exc.headers)


async def _server_error(request: Request, exc: Exception):
    logger.exception("unhandled error on %s", request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}")


class DrainMiddleware:
    """Refuse new generation work while draining; count requests in flight."""

    WORK = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.WORK:
            return await self.app(scope, receive, send)
        if self.state.draining:
            resp = error_response(503, "server is shutting down", headers={"Retry-After": "5"})
            return await resp(scope, receive, send)
        self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1


def build_app(llm: AsyncLLM, cfg: ServeConfig, metrics: ServerMetrics | None = None):
    """The Starlette app (wrapped in the drain and auth middlewares)."""
    if metrics is None:
        metrics = ServerMetrics(cfg.served_model_names[0])
        metrics.registry.register(DeviceCollector())
    if metrics not in llm.stat_loggers:
        llm.stat_loggers.append(metrics)
    metrics.watch(llm.engine)
    state = ServerState(llm, cfg, metrics)
    routes = [
        Route("/health", misc.health, methods=["GET"]),
        Route("/version", misc.version, methods=["GET"]),
        Route("/v1/models", misc.models, methods=["GET"]),
        Route("/metrics", misc.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", misc.openapi, methods=["GET"]),
        Route("/tokenize", _wrap(misc.tokenize), methods=["POST"]),
        Route("/detokenize", _wrap(misc.detokenize), methods=["POST"]),
        Route("/v1/completions", _wrap(completions), methods=["POST"]),
        Route("/v1/chat/completions", _wrap(chat_completions), methods=["POST"]),
        WebSocketRoute("/v1/stream", stream_ws),
    ]
    if cfg.dashboard:  # GET /dashboard and /v1/engine/state
        routes += dashboard.routes(llm)
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error,
                                                       Exception: _server_error})
    app.state.jpaged = state
    for name in ("uvicorn.access", "uvicorn.error"):  # they log request paths
        get_logger(name)
    public = {"/health", "/openapi.json"} | ({"/metrics"} if cfg.metrics_public else set())
    # The authenticator: the configured one, else API keys if there are any.
    keys = [k for k in cfg.api_keys if k]
    state.auth = cfg.auth if cfg.auth is not None else (APIKeyAuth(keys) if keys else None)
    outer = AuthMiddleware(DrainMiddleware(app, state), state.auth, public)
    if cfg.dashboard:  # a browser sends the key as HTTP Basic credentials
        outer = dashboard.BrowserAuth(outer)
    outer.state = state  # for run_server and tests
    # The engine and the libraries are loaded by now and live as long as the
    # process: freezing them keeps the garbage collector's full passes (which
    # hold the GIL and so stall the event loop) to objects made while serving.
    gc.freeze()
    return outer


# ------------------------------------------------------------- running
async def _drain_watch(state: ServerState, poll: float = 0.05) -> None:
    """After SIGTERM: wait for requests in flight (up to the deadline), abort
    the rest, then tell uvicorn to exit."""
    while not state.draining:
        await asyncio.sleep(poll)
    logger.warning("shutting down: %d requests in flight, waiting up to %.1fs",
                   state.inflight, state.cfg.shutdown_timeout)
    while state.inflight and time.monotonic() < state.drain_deadline:
        await asyncio.sleep(poll)
    if state.inflight:
        logger.warning("shutdown timeout: aborting %d requests", len(state.active))
        for rid in list(state.active):
            state.llm.abort(rid)
        end = time.monotonic() + 2.0
        while state.inflight and time.monotonic() < end:
            await asyncio.sleep(poll)
    if state.server is not None:
        state.server.should_exit = True


def run_server(args) -> int:
    """Build the engine and serve until SIGTERM/SIGINT (the ``jpaged serve`` command)."""
    import uvicorn

    from jpaged.config.engine import engine_config_from_args
    from jpaged.distributed import multihost
    from jpaged.distributed.mirror import FrozenClock, LeaderEngine, follow
    from jpaged.engine.llm_engine import LLMEngine

    cfg = serve_config_from_args(args)
    if cfg.enable_log_requests:
        logging.getLogger("jpaged.serve.requests").setLevel(logging.INFO)
    engine_cfg = engine_config_from_args(args)
    _, procs, _ = multihost.settings(engine_cfg.distributed_coordinator,
                                     engine_cfg.num_processes, engine_cfg.process_id)
    if procs > 1:  # multi-host: process 0 serves, the others replay its journal
        clock = FrozenClock()
        engine = LLMEngine(engine_cfg, clock=clock)
        if not multihost.is_leader():
            return follow(engine, clock)
        engine = LeaderEngine(engine, clock)
    else:
        engine = LLMEngine(engine_cfg)
    llm = AsyncLLM(engine, max_queue_len=args.max_queue_len)
    app = build_app(llm, cfg)
    state: ServerState = app.state

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if sig not in (signal.SIGTERM, signal.SIGINT):
                return super().handle_exit(sig, frame)
            if not state.draining:
                state.drain_deadline = time.monotonic() + cfg.shutdown_timeout
                state.draining = True
                return
            # A second signal: stop now. Not through uvicorn's handler, which
            # re-raises the signal once serve() returns and so would kill the
            # process before the engine is shut down.
            logger.warning("second signal: aborting %d requests, stopping now",
                           len(state.active))
            for rid in list(state.active):
                state.llm.abort(rid)
            self.should_exit = self.force_exit = True

    server = _Server(uvicorn_config(
        app, args.host, args.port, args.max_header_bytes, args.uvicorn_log_level,
        limit_concurrency=args.limit_concurrency, timeout_keep_alive=args.timeout_keep_alive,
        head_timeout=args.request_head_timeout))
    state.server = server

    async def main():
        grpc_server = None
        if cfg.grpc_port is not None:
            from jpaged.serve.grpc.server import start_grpc_server

            grpc_server = await start_grpc_server(llm, cfg.grpc_port, state.auth, state=state,
                                                  host=args.host)
        watch = asyncio.ensure_future(_drain_watch(state))
        try:
            await server.serve()
        finally:
            watch.cancel()
            if grpc_server is not None:
                await grpc_server.stop(grace=0.5)  # the drain has already waited

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()
        if isinstance(engine, LeaderEngine):
            engine.close()
        state.close()
    return 0

"""The gRPC server: `GenerationServicer` behind authentication, with the
standard health service and server reflection (`start_grpc_server`).

Every method but ``grpc.health.v1.Health`` (probes send no credentials, as
``/health`` needs none over HTTP) goes through `AuthInterceptor`, which builds
an auth scope from the call's metadata and asks the same authenticator as the
HTTP API; a refusal ends the call with ``UNAUTHENTICATED`` (or
``PERMISSION_DENIED`` for a missing scope) before the handler runs. The
health status follows the engine: ``SERVING`` while it runs, ``NOT_SERVING``
once it died or the server drains. Under ``jpaged serve`` the HTTP server's
drain covers gRPC calls too (they count in the shared `ServerState`);
`GrpcServer.drain` does the same for a gRPC server on its own: refuse new
calls with ``UNAVAILABLE``, let calls in flight finish up to a deadline,
abort the rest, stop.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from jpaged.serve.auth_plugins import Principal, authenticate
from jpaged.serve.grpc.servicer import PRINCIPAL, GenerationServicer
from jpaged.serve.grpc.stubs import SERVICE

logger = logging.getLogger(__name__)

PUBLIC_METHODS = frozenset({f"/{HEALTH_SERVICE}/Check", f"/{HEALTH_SERVICE}/Watch"})
_HEALTH_POLL_S = 0.5


def _as(principal: str, handler):
    """``handler`` (of this service) with `PRINCIPAL` set while it runs."""
    if handler.unary_stream is not None:
        inner = handler.unary_stream

        async def stream(request, context):
            PRINCIPAL.set(principal)  # this call's own task context
            async for msg in inner(request, context):
                yield msg
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    inner_unary = handler.unary_unary

    async def unary(request, context):
        PRINCIPAL.set(principal)
        return await inner_unary(request, context)
    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


def _denied(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as ``handler`` that ends the call with ``code``."""
    async def deny(request, context):
        await context.abort(code, message)

    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
             ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attr, make in kinds:
        if getattr(handler, attr) is not None:
            return make(deny, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    raise TypeError(f"unknown handler kind: {handler!r}")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Ask ``auth`` about every call but the health checks (see module doc)."""

    def __init__(self, auth, public_methods=PUBLIC_METHODS):
        self.auth, self.public = auth, frozenset(public_methods)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method in self.public:
            return handler
        headers = [(k.lower().encode(), v.encode() if isinstance(v, str) else bytes(v))
                   for k, v in details.invocation_metadata or ()]
        result = await authenticate(self.auth, {"type": "grpc", "path": details.method,
                                                "headers": headers})
        if isinstance(result, Principal):
            if details.method.startswith(f"/{SERVICE}/"):
                return _as(result.subject, handler)
            return handler
        code = {401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED}.get(result.status,
                                                            grpc.StatusCode.INTERNAL)
        return _denied(handler, code, result.message)


class GrpcServer:
    """A started gRPC server (see `start_grpc_server`)."""

    def __init__(self, server: grpc.aio.Server, servicer: GenerationServicer,
                 health: health_aio.HealthServicer, port: int, own_state: bool):
        self.server, self.servicer, self.health, self.port = server, servicer, health, port
        self.state = servicer.state
        self.draining = False
        self._own_state = own_state  # built here, so closed here
        self._status = None
        self._watch = asyncio.ensure_future(self._watch_health())

    def is_draining(self) -> bool:
        return self.draining or self.state.draining

    async def _set_health(self) -> None:
        serving = self.servicer.llm.is_running and not self.is_draining()
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != self._status:
            self._status = status
            for name in ("", SERVICE):
                await self.health.set(name, status)

    async def _watch_health(self) -> None:
        while True:
            try:
                await self._set_health()
            except Exception:  # noqa: BLE001 - keep watching; a probe will tell
                logger.exception("gRPC health update failed")
            await asyncio.sleep(_HEALTH_POLL_S)

    async def drain(self, timeout: float) -> None:
        """Refuse new calls, wait up to ``timeout`` s for calls in flight,
        abort what is left, and stop the server."""
        self.draining = True
        await self._set_health()
        deadline = time.monotonic() + timeout
        while self.state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self.state.active):
            self.state.llm.abort(rid)
        await self.stop(grace=2.0)

    async def stop(self, grace: float | None = None) -> None:
        self._watch.cancel()
        await self.server.stop(grace)
        if self._own_state:
            self.state.close()


async def start_grpc_server(llm, port: int, auth=None, *, state=None,
                            served_model_name: str | None = None, host: str = "0.0.0.0",
                            max_message_bytes: int | None = None) -> GrpcServer:
    """Serve ``jpaged.v1.Generation`` for ``llm`` on ``host:port`` (0: any free
    port; the bound one is ``.port``) in the running event loop.

    Args:
        auth: an authenticator (`jpaged.serve.auth_plugins`), or None for none.
        state: the HTTP server's `ServerState`, whose limits, tokenizer
            workers and drain state the gRPC API shares; without it, one with
            default settings for ``served_model_name``.
        max_message_bytes: the largest request accepted (default: the HTTP
            body limit, ``max_request_bytes``).
    """
    own = state is None
    if own:
        from jpaged.serve.metrics import ServerMetrics
        from jpaged.serve.openai.state import ServeConfig, ServerState

        if not served_model_name:
            raise ValueError("served_model_name is required without a state")
        state = ServerState(llm, ServeConfig(served_model_names=[served_model_name]),
                            ServerMetrics(served_model_name))
    servicer = GenerationServicer(state)
    interceptors = [AuthInterceptor(auth)] if auth is not None else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", max_message_bytes or state.cfg.max_request_bytes),
        ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((servicer.handler(),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME),
                                        server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise ValueError(f"grpc_port={port}: cannot listen on {host}:{port}")
    await server.start()
    handle = GrpcServer(server, servicer, health, bound, own)
    servicer.is_draining = handle.is_draining
    await handle._set_health()
    logger.info("gRPC server listening on %s:%d", host, bound)
    return handle

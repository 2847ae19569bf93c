"""``/v1/stream``: completions and chat completions streamed over a WebSocket.

The client sends JSON text messages:

- ``{"type": "completion.create" | "chat.completion.create", "id": ID,
  "body": {...}}``: the body of ``POST /v1/completions`` or
  ``/v1/chat/completions`` (always streamed). The server answers with
  ``{"type": "delta", "id": ID, "data": CHUNK}``, where ``CHUNK`` is exactly
  the JSON of the SSE stream's ``data:`` lines, and at the end
  ``{"type": "done", "id": ID, "usage": {...}}``.
- ``{"type": "cancel", "id": ID}``: abort that request (its blocks are freed);
  answered with ``{"type": "cancelled", "id": ID}``.

Several requests may run at once on one socket (up to `MAX_PER_SOCKET`),
told apart by the client's ``id``. A bad message (not JSON, an unknown type,
over ``max_request_bytes``, a refused body) gets ``{"type": "error", "id":
ID or null, "error": {...}}`` in OpenAI's error shape and the socket stays
open. Each request goes through the same route code as HTTP (validation,
limits, tokenization, the principal's cache salt), by handing the route a
request built from the socket's scope. Closing the socket aborts every
request on it. Authentication is the upgrade request's ``Authorization``
header, checked by the auth middleware before the socket is accepted.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from starlette.requests import Request
from starlette.websockets import WebSocket, WebSocketDisconnect

from jpaged.engine.async_llm import EngineDeadError
from jpaged.serve.logsafe import get_logger
from jpaged.serve.openai.errors import APIError, error_body, param_of
from jpaged.serve.openai.routes_chat import chat_completions
from jpaged.serve.openai.routes_completions import completions
from jpaged.serve.openai.streams import SSEResponse

logger = get_logger(__name__)

MAX_PER_SOCKET = 16
ROUTES = {"completion.create": ("/v1/completions", completions),
          "chat.completion.create": ("/v1/chat/completions", chat_completions)}


class _Socket:
    """One accepted socket: its running requests and a send lock."""

    def __init__(self, ws: WebSocket):
        self.ws, self.state = ws, ws.app.state.jpaged
        self.tasks: dict[str, asyncio.Task] = {}
        self.lock = asyncio.Lock()  # one frame at a time from several tasks

    async def send(self, obj: dict) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancel (a "cancel" message) that lands as the send completes.
        async with self.lock, asyncio.timeout(self.state.cfg.send_timeout):
            await self.ws.send_text(json.dumps(obj))

    async def error(self, rid, status: int, message: str, param: str | None = None):
        await self.send({"type": "error", "id": rid, **error_body(status, message, param)})

    async def handle(self, raw) -> None:
        limit = self.state.cfg.max_request_bytes
        if raw is None or len(raw) > limit:
            return await self.error(None, 413, f"message is over max_request_bytes={limit}")
        try:
            msg = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return await self.error(None, 400, f"message is not valid JSON: {e}")
        if not isinstance(msg, dict):
            return await self.error(None, 400, "message must be a JSON object")
        kind, rid = msg.get("type"), msg.get("id")
        if rid is not None and not isinstance(rid, (str, int)):
            return await self.error(None, 400, "id must be a string or an integer", "id")
        rid = None if rid is None else str(rid)[:200]
        if kind == "cancel":
            task = self.tasks.get(rid)
            if task is None:
                return await self.error(rid, 404, f"no request with id={rid!r} is running",
                                        "id")
            task.cancel()
            return
        if kind not in ROUTES:
            return await self.error(rid, 400, f"type={str(kind)[:100]!r} is unknown; use "
                                    f"{', '.join(ROUTES)} or cancel", "type")
        rid = rid or uuid.uuid4().hex
        body = msg.get("body")
        if rid in self.tasks:
            return await self.error(rid, 400, f"id={rid!r} is already running", "id")
        if len(self.tasks) >= MAX_PER_SOCKET:
            return await self.error(rid, 400, f"{MAX_PER_SOCKET} requests are already "
                                    "running on this socket")
        if not isinstance(body, dict):
            return await self.error(rid, 400, "body must be a JSON object", "body")
        if self.state.draining:
            return await self.error(rid, 503, "server is shutting down")
        task = asyncio.ensure_future(self.run(rid, kind, body))
        self.tasks[rid] = task
        task.add_done_callback(lambda t: self.tasks.pop(rid, None) if
                               self.tasks.get(rid) is t else None)

    def _request(self, path: str, body: dict) -> Request:
        """An HTTP request for the route, carrying the socket's scope (auth included)."""
        payload = json.dumps(dict(body, stream=True,
                                  stream_options={"include_usage": True})).encode()
        scope = dict(self.ws.scope, type="http", method="POST", path=path,
                     raw_path=path.encode(), query_string=b"",
                     headers=[(k, v) for k, v in self.ws.scope["headers"]
                              if k not in (b"content-length", b"content-type")]
                     + [(b"content-length", str(len(payload)).encode()),
                        (b"content-type", b"application/json")])
        sent = False
        never = asyncio.get_running_loop().create_future()

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await never  # the socket, not this request, tells of a disconnect

        return Request(scope, receive)

    async def run(self, rid: str, kind: str, body: dict) -> None:
        path, route = ROUTES[kind]
        self.state.inflight += 1
        resp = None
        try:
            try:
                resp = await route(self._request(path, body))
            except APIError as e:
                return await self.error(rid, e.status, e.message, e.param)
            except EngineDeadError as e:
                return await self.error(rid, 503, str(e))
            except ValueError as e:
                return await self.error(rid, 400, str(e), param_of(str(e)))
            if not isinstance(resp, SSEResponse):  # a route answered without streaming
                return await self.error(rid, 500, "the route did not stream")
            usage = None
            async for chunk in resp.chunks:
                data = chunk.removeprefix("data: ").strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:  # failed after it started: reported in-band
                    await self.send({"type": "error", "id": rid, **obj})
                    return
                if obj.get("usage") and not obj.get("choices"):
                    usage = obj["usage"]  # the include_usage chunk: goes in "done"
                    continue
                await self.send({"type": "delta", "id": rid, "data": obj})
            await self.send({"type": "done", "id": rid, "usage": usage})
        except asyncio.CancelledError:
            await self._cancelled(rid)
            raise
        except (TimeoutError, OSError, WebSocketDisconnect) as e:
            logger.warning("websocket request %s aborted: cannot send (%r)", rid, e)
        finally:
            self.state.inflight -= 1
            if resp is not None:
                await resp.chunks.aclose()
                resp.on_close()  # aborts whatever has not finished

    async def _cancelled(self, rid: str) -> None:
        try:
            await self.send({"type": "cancelled", "id": rid})
        except Exception:  # noqa: BLE001 - the socket may be gone (that is why)
            pass

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def stream_ws(ws: WebSocket) -> None:
    await ws.accept()
    sock = _Socket(ws)
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            await sock.handle(msg.get("text") if msg.get("text") is not None
                              else msg.get("bytes"))
    except (WebSocketDisconnect, TimeoutError, OSError):
        pass  # the client went away or stopped reading: abort its requests
    finally:
        await sock.close()

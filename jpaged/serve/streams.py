"""Generation plumbing for the HTTP routes: engine requests of one HTTP
request (`Generation`), disconnect watching, and Server-Sent Events.

A client that goes away is noticed by waiting on ``receive()`` for
``http.disconnect`` next to the work (`run_until_disconnect` for plain
responses, `SSEResponse` for streams); the work is then cancelled, which
closes its `RequestStream`s and so aborts the engine requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from jpaged.sampling_params import SamplingParams

request_logger = logging.getLogger("jpaged.serve.requests")


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class Generation:
    """One HTTP request's engine requests: submit, merge outputs, abort on exit."""

    def __init__(self, state, base_id: str, prompts: list[list[int]],
                 params: SamplingParams, priority: int, output_kind: str):
        self.state, self.base_id, self.prompts = state, base_id, prompts
        self.params, self.priority, self.output_kind = params, priority, output_kind
        self.streams = []
        self.start = time.monotonic()
        self.completion_tokens = 0
        self.finish_reasons: list = []
        self.submitted = False

    async def submit(self) -> None:
        llm = self.state.llm
        try:
            for i, ids in enumerate(self.prompts):
                rid = f"{self.base_id}-{i}"
                stream = await llm.add_request(rid, {"prompt_token_ids": ids}, self.params,
                                               priority=self.priority,
                                               output_kind=self.output_kind)
                self.streams.append(stream)
                self.state.active.add(rid)
            self.submitted = True
        except BaseException:
            self.close()
            raise

    async def outputs(self):
        """Yield (prompt index, output) from all streams as they come."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for out in stream:
                    await q.put((i, out))
                await q.put((i, None))
            except BaseException as e:  # noqa: BLE001 - re-raised by the reader
                await q.put((i, e))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            left = len(tasks)
            while left:
                i, item = await q.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    def close(self) -> None:
        """Abort whatever has not finished; log the request if asked."""
        for stream in self.streams:
            self.state.active.discard(stream.request_id)
            if not stream.finished:
                stream.close()
                self.state.metrics.on_abort(stream.request_id)
        if self.state.cfg.enable_log_requests and self.submitted:
            request_logger.info(
                "request %s: prompts=%d prompt_tokens=%d output_tokens=%d latency=%.3fs "
                "finish=%s", self.base_id, len(self.prompts), sum(map(len, self.prompts)),
                self.completion_tokens, time.monotonic() - self.start,
                ",".join(str(r) for r in self.finish_reasons) or "abort")
        self.streams = []


async def _wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def run_until_disconnect(request, coro):
    """Await ``coro``; cancel it (aborting its requests) if the client leaves."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - the client is gone either way
        pass
    raise ClientGone()


class SSEResponse:
    """Server-Sent Events from an async iterator of strings; stops (and closes
    the iterator, which aborts the requests) when the client disconnects."""

    def __init__(self, chunks, on_close):
        self.chunks, self.on_close = chunks, on_close
        self.status_code = 200
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})

        async def produce():
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode(),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        producer = asyncio.ensure_future(produce())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not producer.done():
                producer.cancel()
            try:
                await producer
            except (asyncio.CancelledError, OSError):
                pass
        finally:
            watcher.cancel()
            if not producer.done():
                producer.cancel()
            await self.chunks.aclose()
            self.on_close()


def sse(obj) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


def error_chunk(e: BaseException) -> str:
    """An error after the stream started, in OpenAI's error shape."""
    status, kind = (400, "BadRequestError") if isinstance(e, ValueError) else \
        (500, "InternalServerError")
    msg = str(e) or type(e).__name__
    return sse({"error": {"message": msg[:2000], "type": kind, "param": None,
                          "code": status}})

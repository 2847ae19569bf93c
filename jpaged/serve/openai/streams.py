"""Generation plumbing for the HTTP routes: engine requests of one HTTP
request (`Generation`: submit, merged outputs, abort on exit), disconnect
watching, and Server-Sent Events.

A client that goes away is noticed by waiting on ``receive()`` for
``http.disconnect`` next to the work (`run_until_disconnect` for plain
responses, `SSEResponse` for streams); the work is then cancelled, which
closes its `RequestStream`s and so aborts the engine requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

from jpaged.engine.async_llm import EngineDeadError, QueueFullError, RequestFailed
from jpaged.sampling_params import SamplingParams
from jpaged.sched.policy import RequestRefused
from jpaged.serve.auth import PRINCIPAL
from jpaged.serve.logsafe import get_logger
from jpaged.serve.openai import protocol as P
from jpaged.serve.openai.errors import APIError, param_of

logger = get_logger(__name__)
request_logger = get_logger("jpaged.serve.requests")


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class Generation:
    """One HTTP request's engine requests: submit, merge outputs, abort on exit."""

    def __init__(self, state, request, base_id: str, prompts: list[list[int]],
                 params: SamplingParams, priority: int, output_kind: str):
        self.state, self.base_id, self.prompts = state, base_id, prompts
        self.params, self.output_kind = params, output_kind
        # Clients choose their priority only where the server allows it.
        self.priority = priority if state.cfg.allow_client_priority else 0
        # Tenants share prefix-cache blocks only with themselves.
        self.cache_salt = request.scope.get(PRINCIPAL)
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
                                               cache_salt=self.cache_salt,
                                               output_kind=self.output_kind)
                self.streams.append(stream)
                self.state.active.add(rid)
            self.submitted = True
        except BaseException:
            self.close()
            raise

    async def submit_or_raise(self) -> None:
        """`submit`, with the engine's refusals as `APIError`s (400 or 503)."""
        try:
            await self.submit()
        except QueueFullError as e:
            raise APIError(503, str(e), headers={"Retry-After": "1"}) from None
        except RequestRefused as e:
            raise refused_error(e) from None
        except EngineDeadError as e:
            raise APIError(503, str(e)) from None
        except ValueError as e:
            raise APIError(400, str(e), param_of(str(e))) from None

    async def collect(self) -> list:
        """Every prompt's final output (for non-streaming responses); a request
        refused while it waited (deadline) is a 503 with Retry-After."""
        finals = [None] * len(self.prompts)
        try:
            async for i, out in self.outputs():
                finals[i] = out
        except RequestRefused as e:
            raise refused_error(e) from None
        except RequestFailed as e:  # its engine step (or its detokenization) failed
            raise APIError(500, str(e)) from None
        for out in finals:
            for o in out.outputs if out is not None else ():
                self.completion_tokens += len(o.token_ids)
                self.finish_reasons.append(o.finish_reason)
        if any(f is None or not f.finished for f in finals):
            raise EngineDeadError("generation ended without a final output")
        return finals

    def usage(self, prompt_tokens: int) -> P.UsageInfo:
        return P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=self.completion_tokens,
                           total_tokens=prompt_tokens + self.completion_tokens)

    async def outputs(self):
        """Yield (prompt index, output) from all streams as they come."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield 0, out
            return
        # Bounded: while the reader is busy, pumps wait and each stream keeps
        # merging its outputs, so nothing piles up here either.
        q: asyncio.Queue = asyncio.Queue(maxsize=len(self.streams))

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
            stream.close()  # aborts it if unfinished; the metrics hear of it then
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


async def collect_final(request, gen: Generation):
    """A non-streaming request's final outputs, or None if the client left
    first; the generation is closed either way."""
    try:
        return await run_until_disconnect(request, gen.collect())
    except ClientGone:
        return None
    finally:
        gen.close()


async def guarded_stream(gen: Generation, chunks):
    """SSE chunks, then ``[DONE]``; a failure after the stream started is sent
    in-band as an error chunk before ``[DONE]``."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
        logger.warning("stream %s failed: %r", gen.base_id, e)
        yield error_chunk(e)
    yield "data: [DONE]\n\n"


class SSEResponse:
    """Server-Sent Events from an async iterator of strings; stops (and closes
    the iterator, which aborts the requests) when the client disconnects, or
    when one chunk could not be handed to the socket within ``send_timeout``
    seconds (a client that stopped reading: its blocks are freed, and what
    it would have been sent is not kept)."""

    def __init__(self, chunks, on_close, send_timeout: float | None = None):
        self.chunks, self.on_close, self.send_timeout = chunks, on_close, send_timeout
        self.status_code = 200
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})

        async def produce():
            async for chunk in self.chunks:
                msg = {"type": "http.response.body", "body": chunk.encode(), "more_body": True}
                try:
                    await asyncio.wait_for(send(msg), self.send_timeout)
                except TimeoutError:
                    logger.warning("stream aborted: the client read nothing for %gs",
                                   self.send_timeout)
                    return
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
    """One event from a pydantic model, a dict, or already-encoded JSON."""
    data = obj if isinstance(obj, str) else obj.model_dump_json() \
        if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


def error_chunk(e: BaseException) -> str:
    """An error after the stream started, in OpenAI's error shape."""
    status, kind = (400, "BadRequestError") if isinstance(e, ValueError) else \
        (503, "ServiceUnavailableError") if isinstance(e, RequestRefused) else \
        (500, "InternalServerError")
    msg = str(e) or type(e).__name__
    return sse({"error": {"message": msg[:2000], "type": kind, "param": None,
                          "code": status}})


def refused_error(e: RequestRefused) -> APIError:
    """A deadline refusal: 503 (the request may succeed later), Retry-After in seconds."""
    return APIError(503, str(e), headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))})

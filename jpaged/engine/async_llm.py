"""`AsyncLLM`: the engine loop in a background thread, requests as async streams.

The life of a request:

1. `add_request` (a coroutine, on the event loop) puts an ``add`` command on a
   thread-safe queue and waits until the loop thread has called
   `LLMEngine.add_request`; a `ValueError` from validation is raised back to
   the caller, and a full waiting queue raises `QueueFullError`, without
   touching any other request.
2. The loop thread drains commands (adds, aborts), calls `LLMEngine.step`, and
   hands each step's outputs to the event loop in one
   ``loop.call_soon_threadsafe`` call, which merges each into its
   `RequestStream` (see `jpaged.engine.request_stream`).
3. The engine is asked for deltas; `RequestStream` (an async iterator)
   yields what its reader asked for: cumulative outputs, deltas (only the
   new text, token ids and logprobs of each sample) with
   ``output_kind="delta"``, or the final output alone with ``"final_only"``.
   Outputs that arrive while the reader is busy are merged as they arrive.
4. Closing or cancelling the iterator before the request finished (a client
   disconnect) aborts it; the engine frees its blocks at once, and the stat
   loggers' ``on_abort`` drops what they held for it.
5. An exception in `LLMEngine.step` fails the requests of that step with
   `RequestFailed` (`LLMEngine.fail_step`, see `jpaged.engine.recovery`);
   ``is_running`` is False while that runs, and the loop then goes on with
   the other requests. If recovery is impossible (an engine without
   ``fail_step``, a failing ``fail_step``, or `_MAX_STEP_FAILURES` failed steps
   in a row) every in-flight request fails with `EngineDeadError`, `errored`
   is set and the loop stops; `shutdown` stops it cleanly.

Only the loop thread ever touches the engine. Tested with a fake engine whose
outputs are known by hand and against the real engine through the server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from jpaged.engine.recovery import RequestFailed
from jpaged.engine.request_stream import ABORTED, RequestStream
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import OUTPUT_KINDS, SamplingParams
from jpaged.sched.policy import RequestRefused

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5
_MAX_STEP_FAILURES = 3  # failed steps in a row before the engine is declared dead


class EngineDeadError(RuntimeError):
    """The engine loop died; no request can run until the process restarts."""


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_queue_len``; retry later."""


class AsyncLLM:
    """Serve an `LLMEngine` to asyncio code.

    Args:
        engine: a built `LLMEngine` (or an object with its request API).
        max_queue_len: refuse new requests (`QueueFullError`) while this many
            are waiting; ``None`` for no limit.
        stat_loggers: objects with optional ``on_step(stats)`` (after each
            step, with `EngineStats`), ``on_add(request_id)`` (the engine
            accepted a request), ``on_output(out)`` (every `RequestOutput`,
            a delta: only the step's new tokens), ``on_abort(request_id)``
            (an unfinished request was aborted) and ``on_fail(request_id)``
            (an unfinished request failed as the engine stopped) methods, called in the loop thread; an exception in one is
            logged and never stops the engine.
    """

    def __init__(self, engine, max_queue_len: int | None = None, stat_loggers=()):
        if max_queue_len is not None and max_queue_len < 1:
            raise ValueError(f"max_queue_len={max_queue_len} must be at least 1")
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.stat_loggers = list(stat_loggers)
        self.errored: BaseException | None = None
        self.recovering = False  # failing the requests of a step that raised
        self.step_failures = 0  # steps that raised, in all
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jpaged-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config=None, max_queue_len: int | None = None, stat_loggers=(),
                    **kwargs) -> "AsyncLLM":
        from jpaged.config.engine import EngineConfig
        from jpaged.engine.llm_engine import LLMEngine

        return cls(LLMEngine(config or EngineConfig(**kwargs)), max_queue_len, stat_loggers)

    # ------------------------------------------------------------ public
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.errored is None and not self.recovering

    async def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                          priority: int = 0, cache_salt: str | None = None,
                          output_kind: str = "cumulative") -> RequestStream:
        """Submit a request; returns its stream once the engine has accepted it.

        Raises:
            ValueError: the engine refused the request (bad prompt or params).
            QueueFullError: ``max_queue_len`` requests are already waiting.
            RequestRefused: it cannot meet its deadline (also raised by the
                stream later, if it is refused while waiting).
            EngineDeadError: the engine loop is dead or shut down.
        """
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind={output_kind!r} must be one of "
                             f"{', '.join(OUTPUT_KINDS)}")
        self._check_alive()
        # The engine sends deltas; the stream builds what its reader asked for.
        params = (params or SamplingParams()).clone()
        params.output_kind = "delta"
        stream = RequestStream(self, request_id, output_kind)
        accepted = stream.loop.create_future()
        self._commands.put(("add", (request_id, prompt, params, priority, cache_salt),
                            stream, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been added meanwhile
            raise
        return stream

    async def generate(self, prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       cache_salt: str | None = None,
                       output_kind: str = "delta") -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (deltas by default); see `add_request`."""
        if request_id is None:
            import uuid

            request_id = uuid.uuid4().hex
        stream = await self.add_request(request_id, prompt, sampling_params, priority,
                                        cache_salt, output_kind)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished); thread-safe."""
        self._commands.put(("abort", request_id, None, None))

    def call(self, fn: Callable, timeout: float = 30.0):
        """Run ``fn(engine)`` in the loop thread and return its result (blocking)."""
        done = threading.Event()
        box: list = []
        self._commands.put(("call", fn, box, done))
        if not done.wait(timeout):
            raise TimeoutError("engine loop did not answer")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread; unfinished requests fail with `EngineDeadError`."""
        self._stop.set()
        self._commands.put(("wake", None, None, None))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        logger.info("engine loop stopped")

    def _check_alive(self) -> None:
        if self.errored is not None:
            raise EngineDeadError(f"engine is dead: {self.errored!r}")
        if self._stop.is_set() or not self._thread.is_alive():
            raise EngineDeadError("engine is shut down")

    # ------------------------------------------------------- loop thread
    def _run(self) -> None:
        engine = self.engine
        failures = 0  # in a row
        try:
            while not self._stop.is_set():
                busy = engine.has_unfinished_requests()
                aborted = self._drain_commands(block=not busy)
                if self._stop.is_set():
                    break
                if engine.has_unfinished_requests() or aborted:
                    try:
                        outs = engine.step()
                    except Exception as e:  # noqa: BLE001 - fail that step's requests
                        failures += 1
                        if failures > _MAX_STEP_FAILURES or \
                                not hasattr(engine, "fail_step"):
                            raise
                        self._recover(e)
                        continue
                    failures = 0
                    self._deliver(outs)
                    self._on_step()
        except BaseException as e:  # noqa: BLE001 - the engine is dead, tell everyone
            logger.exception("engine loop died")
            self.errored = e
            self._fail_all(EngineDeadError(f"engine error: {e!r}"))
            self._fail_commands(EngineDeadError(f"engine error: {e!r}"))
            return
        self._fail_all(EngineDeadError("engine is shut down"))
        self._fail_commands(EngineDeadError("engine is shut down"))

    def _recover(self, err: Exception) -> None:
        """Fail the requests of the step that raised ``err``; the engine is
        reported down (``is_running`` False) until this returns."""
        logger.exception("engine step failed: failing its requests", exc_info=err)
        self.recovering = True
        self.step_failures += 1
        try:
            self._deliver(self.engine.fail_step(err))
            self._on_step()
            hold = getattr(getattr(self.engine, "faults", None), "hold_s", 0.0)
            if hold:  # test-only (jpaged.engine.faults): make the outage observable
                self._stop.wait(hold)
        finally:
            self.recovering = False

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; returns whether any request was aborted."""
        aborted = False
        try:
            cmd = self._commands.get(timeout=_IDLE_WAIT_S) if block \
                else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            kind, a, b, c = cmd
            if kind == "add":
                self._add(a, b, c)
            elif kind == "abort":
                self.engine.abort_request(a)  # a no-op for a finished request
                aborted = True
                stream = self._streams.pop(a, None)
                if stream is not None:  # it was unfinished
                    _call_soon(stream.loop, _push_all, [(stream, ABORTED)])
                    self._notify("on_abort", a)
            elif kind == "call":
                try:
                    b.append(a(self.engine))
                except Exception as e:  # noqa: BLE001 - handed back to the caller
                    b.append(e)
                c.set()
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return aborted

    def _add(self, args, stream: RequestStream, accepted: asyncio.Future) -> None:
        request_id, prompt, params, priority, cache_salt = args
        err = None
        if self.max_queue_len is not None and \
                len(self.engine.scheduler.waiting) >= self.max_queue_len:
            err = QueueFullError(f"the waiting queue is full ({self.max_queue_len} requests)")
        else:
            try:
                self.engine.add_request(request_id, prompt, params, priority=priority,
                                        cache_salt=cache_salt)
            except Exception as e:  # noqa: BLE001 - this request's own fault
                err = e if isinstance(e, (ValueError, RequestRefused)) else ValueError(str(e))
        if err is None:
            self._streams[request_id] = stream
            self._notify("on_add", request_id)
        if not _call_soon(stream.loop, _settle, accepted, err) and err is None:
            # Its event loop is gone: nobody will read or abort it.
            self.engine.abort_request(request_id)
            self._streams.pop(request_id, None)
            self._notify("on_abort", request_id)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        by_loop: dict = {}
        for out in outs:
            self._notify("on_output", out)
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if stream is not None:  # a refusal (deadline) is raised to the reader
                by_loop.setdefault(stream.loop, []).append(
                    (stream, out.error if out.error is not None else out))
        for loop, items in by_loop.items():
            if not _call_soon(loop, _push_all, items):
                # That event loop is closed: its requests can never be read.
                logger.warning("an event loop closed under %d requests: aborting them",
                               len(items))
                for stream, out in items:
                    if not out.finished and self._streams.pop(stream.request_id, None):
                        self.engine.abort_request(stream.request_id)
                        self._notify("on_abort", stream.request_id)

    def _on_step(self) -> None:
        if any(hasattr(sl, "on_step") for sl in self.stat_loggers):
            self._notify("on_step", self.engine.get_stats())

    def _notify(self, hook: str, arg) -> None:
        for sl in self.stat_loggers:
            fn = getattr(sl, hook, None)
            if fn is not None:
                try:
                    fn(arg)
                except Exception:  # noqa: BLE001 - an observer must not kill the engine
                    logger.exception("stat logger %s.%s failed", type(sl).__name__, hook)

    def _fail_all(self, err: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            _call_soon(stream.loop, _push_all, [(stream, err)])
            self._notify("on_fail", stream.request_id)

    def _fail_commands(self, err: BaseException) -> None:
        while True:
            try:
                kind, a, b, c = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                _call_soon(b.loop, _settle, c, err)
            elif kind == "call":
                b.append(err)
                c.set()


def _settle(fut: asyncio.Future, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


def _push_all(items) -> None:
    for stream, item in items:
        stream.push(item)


def _call_soon(loop, fn, *args) -> bool:
    """``loop.call_soon_threadsafe``; False when that loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # the event loop is closed: nobody is listening
        return False


__all__ = ["AsyncLLM", "EngineDeadError", "QueueFullError", "RequestFailed", "RequestRefused",
           "RequestStream"]

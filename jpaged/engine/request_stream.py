"""`RequestStream`: one request's outputs as an async iterator, with the
outputs the reader has not taken yet merged as they arrive.

The engine thread hands each output to the stream's event loop (`push`).
The stream never queues outputs: it keeps the part its reader has not read
as one merged delta (``output_kind="delta"``) or as the newest cumulative
state (``"cumulative"``), so a reader that stops reading holds at most its
own output, never a copy per step. When the request is aborted under its
reader (server shutdown, a deadline), the final output is built from that
newest state, so it carries every token generated before the abort.

The engine is asked for deltas (``SamplingParams.output_kind="delta"``: each
output carries only what is new since the request's previous one), so the
engine thread's work per step does not grow with a request's length; the
cumulative state is built here, for readers that ask for it. A
``"final_only"`` reader gets the one finished output.
"""

from __future__ import annotations

import asyncio
import dataclasses

from jpaged.outputs import CompletionOutput, RequestOutput

ABORTED = object()  # pushed when the request was aborted by someone else than its reader


def merge_into(acc: RequestOutput | None, d: RequestOutput) -> RequestOutput:
    """Append delta ``d`` to ``acc`` (owned by the caller, changed in place);
    returns the result. ``d`` is copied, never kept."""
    if acc is None:
        acc = dataclasses.replace(d, outputs=[])
    else:
        acc.finished, acc.metrics = d.finished, d.metrics
        acc.num_cached_tokens = d.num_cached_tokens
    by_index = {o.index: o for o in acc.outputs}
    for o in d.outputs:
        a = by_index.get(o.index)
        if a is None:
            a = CompletionOutput(o.index, "", [], None,
                                 [] if o.logprobs is not None else None)
            by_index[o.index] = a
            acc.outputs.append(a)
        a.text += o.text
        a.token_ids.extend(o.token_ids)
        if o.logprobs is not None:
            if a.logprobs is None:
                a.logprobs = []
            a.logprobs.extend(o.logprobs)
        a.cumulative_logprob = o.cumulative_logprob
        a.finish_reason, a.stop_reason = o.finish_reason, o.stop_reason
    acc.outputs.sort(key=lambda o: o.index)
    return acc


def snapshot(out: RequestOutput) -> RequestOutput:
    """A copy whose lists the stream will not change later."""
    return dataclasses.replace(out, outputs=[dataclasses.replace(
        o, token_ids=list(o.token_ids),
        logprobs=list(o.logprobs) if o.logprobs is not None else None) for o in out.outputs])


def aborted_final(request_id: str, out: RequestOutput | None,
                  open_samples: set[int]) -> RequestOutput:
    """``out`` marked finished: its samples, and any other sample still open,
    get finish reason "abort"."""
    if out is None:
        out = RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[],
                            outputs=[], finished=True)
    outs = [dataclasses.replace(o, finish_reason=o.finish_reason or "abort")
            for o in out.outputs]
    have = {o.index for o in outs}
    outs += [CompletionOutput(i, "", [], None, None, "abort")
             for i in sorted(open_samples - have)]
    outs.sort(key=lambda o: o.index)
    return dataclasses.replace(out, outputs=outs, finished=True)


class RequestStream:
    """Async iterator over one request's outputs (see the module docstring)."""

    def __init__(self, llm, request_id: str, output_kind: str):
        self.llm = llm
        self.request_id = request_id
        self.output_kind = output_kind
        self.loop = asyncio.get_running_loop()
        self.finished = False  # the final output (or an error) was read
        self.aborted = False  # closed by its reader before that
        self._wake = asyncio.Event()
        self._acc: RequestOutput | None = None  # unread delta, or the whole state
        self._unread = False
        self._end: object | None = None  # ABORTED or an exception, once pushed
        self._open: set[int] = set()  # samples seen and not finished

    # ------------------------------------------------- event loop, engine side
    def push(self, item) -> None:
        """Take an engine delta, ABORTED or an exception (on ``self.loop``)."""
        if isinstance(item, RequestOutput):
            self._acc = merge_into(self._acc, item)
            self._unread = True
            for o in item.outputs:
                (self._open.discard if o.finish_reason else self._open.add)(o.index)
        elif self._end is None:
            self._end = item
        self._wake.set()

    def _ready(self) -> bool:
        if self._end is not None:
            return True
        return self._unread and (self.output_kind != "final_only" or self._acc.finished)

    # ------------------------------------------------------------ reader side
    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self.aborted:
            raise StopAsyncIteration
        try:
            while not self._ready():
                self._wake.clear()
                await self._wake.wait()
        except BaseException:
            self.close()
            raise
        if isinstance(self._end, BaseException) and not \
                (self._unread and self._acc is not None and self._acc.finished):
            self.finished = True
            raise self._end
        out = self._acc
        if self._end is ABORTED and not (out is not None and out.finished):
            out = aborted_final(self.request_id, out, self._open)
        if out.finished:
            self.finished = True
        self._unread = False
        if self.output_kind == "delta":
            self._acc = None  # the reader owns it now
            return out
        return snapshot(out)

    def close(self) -> None:
        """Abort the request if it has not finished (idempotent)."""
        if not self.finished and not self.aborted:
            self.aborted = True
            self.llm.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

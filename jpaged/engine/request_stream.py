"""`RequestStream`: one request's outputs as an async iterator, with the
outputs the reader has not taken yet merged as they arrive.

The engine is asked for deltas (``SamplingParams.output_kind="delta"``: each
output carries only what is new since the request's previous one), so the
engine thread's work per step does not grow with a request's length. The
engine thread hands each delta to the stream's event loop (`push`), and the
stream never queues them: it appends them to one `_Pending` (text kept as a
list of pieces, joined when read), holding what its reader has not read
(``output_kind="delta"``) or everything so far (``"cumulative"``,
``"final_only"``). A reader that stops reading so holds at most its own
output, never a copy per step. When the request is aborted under its reader
(server shutdown, a deadline), the final output is built from that state, so
it carries every token generated before the abort.
"""

from __future__ import annotations

import asyncio
import dataclasses

from jpaged.outputs import CompletionOutput, RequestOutput

ABORTED = object()  # pushed when the request was aborted by someone else than its reader


@dataclasses.dataclass(slots=True)
class _Sample:
    parts: list = dataclasses.field(default_factory=list)  # text pieces
    token_ids: list = dataclasses.field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _Pending:
    """Deltas appended together; `output` builds a `RequestOutput` from them."""

    def __init__(self):
        self.samples: dict[int, _Sample] = {}
        self.last: RequestOutput | None = None  # the newest delta, for its metadata
        self.finish_sent: set[int] = set()  # samples whose finish reason was read
        # The engine sends prompt logprobs in one delta; kept until read.
        self.prompt_logprobs: list | None = None

    def add(self, d: RequestOutput) -> None:
        self.last = d
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        for o in d.outputs:
            s = self.samples.get(o.index)
            if s is None:
                s = self.samples[o.index] = _Sample()
            if o.text:
                s.parts.append(o.text)
            s.token_ids.extend(o.token_ids)
            if o.logprobs is not None:
                if s.logprobs is None:
                    s.logprobs = []
                s.logprobs.extend(o.logprobs)
            s.cumulative_logprob = o.cumulative_logprob
            s.finish_reason, s.stop_reason = o.finish_reason, o.stop_reason

    def output(self, request_id: str, copy: bool, abort: bool = False,
               fresh_only: bool = False) -> RequestOutput:
        """The state as an output; ``copy`` when the lists stay in use here;
        ``abort`` marks it finished with unfinished samples as "abort";
        ``fresh_only`` leaves out samples with nothing new to say (the engine
        repeats a finished sample, empty, in every later delta)."""
        outs = []
        for index in sorted(self.samples):
            s = self.samples[index]
            done = s.finish_reason is not None or abort
            if fresh_only and not (s.parts or s.token_ids) and \
                    (index in self.finish_sent or not done):
                continue
            if done:
                self.finish_sent.add(index)
            text = "".join(s.parts)
            s.parts = [text] if text else []  # the next join starts from one piece
            outs.append(CompletionOutput(
                index=index, text=text,
                token_ids=list(s.token_ids) if copy else s.token_ids,
                cumulative_logprob=s.cumulative_logprob,
                logprobs=(list(s.logprobs) if copy else s.logprobs)
                if s.logprobs is not None else None,
                finish_reason=s.finish_reason or ("abort" if abort else None),
                stop_reason=s.stop_reason))
        last = self.last or RequestOutput(request_id=request_id, prompt=None,
                                          prompt_token_ids=[], outputs=[], finished=True)
        return dataclasses.replace(last, outputs=outs, finished=last.finished or abort,
                                   prompt_logprobs=self.prompt_logprobs)


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
        self._pending = _Pending()
        self._unread = False
        self._end: object | None = None  # ABORTED or an exception, once pushed

    # ------------------------------------------------- event loop, engine side
    def push(self, item) -> None:
        """Take an engine delta, ABORTED or an exception (on ``self.loop``)."""
        if isinstance(item, RequestOutput):
            self._pending.add(item)
            self._unread = True
        elif self._end is None:
            self._end = item
        self._wake.set()

    def _done(self) -> bool:
        return self._pending.last is not None and self._pending.last.finished

    def _ready(self) -> bool:
        if self._end is not None:
            return True
        return self._unread and (self.output_kind != "final_only" or self._done())

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
        if isinstance(self._end, BaseException) and not self._done():
            self.finished = True
            raise self._end
        abort = self._end is ABORTED and not self._done()
        delta = self.output_kind == "delta"
        out = self._pending.output(self.request_id, copy=not delta, abort=abort,
                                   fresh_only=delta)
        if delta:
            # The reader owns those lists now; keep only which samples exist.
            self._pending.samples = {i: _Sample(finish_reason=s.finish_reason)
                                     for i, s in self._pending.samples.items()}
            self._pending.prompt_logprobs = None
        self._unread = False
        if out.finished:
            self.finished = True
        return out

    def close(self) -> None:
        """Abort the request if it has not finished (idempotent)."""
        if not self.finished and not self.aborted:
            self.llm.abort(self.request_id)
            self.aborted = True

    async def aclose(self) -> None:
        self.close()

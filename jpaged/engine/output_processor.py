"""OutputProcessor: sampled tokens in, stop decisions and `RequestOutput`s out.

Every stop is decided here, in one place: after a sequence gets a token, the
processor records its logprobs, extends its text with the incremental
detokenizer, and checks, in order, EOS and ``stop_token_ids`` (from
``min_tokens`` on), ``max_tokens`` and ``max_model_len``, then the stop
strings (the text is cut before the stop, or after it with
``include_stop_str_in_output``). A finished sequence is handed back to the
scheduler (`Scheduler.finish_requests`), which frees its blocks at once.

Outputs follow ``SamplingParams.output_kind`` as vLLM's ``RequestOutputKind``:
``cumulative`` (everything so far, each time), ``delta`` (only what is new
since the request's previous output: text, token ids and logprobs) or
``final_only`` (one output when the request finishes). Text that may be the
start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jpaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jpaged.sample.prompt_logprobs import position_entries
from jpaged.sampling_params import SamplingParams
from jpaged.sched import Request, RequestStatus
from jpaged.tokenizer import IncrementalDetokenizer


@dataclass(slots=True)
class SampleState:
    """What has been produced and what has been sent of one sample."""

    detok: IncrementalDetokenizer
    text: str = ""
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    sent_tokens: int = 0
    sent_text: int = 0


@dataclass(slots=True)
class RequestState:
    """A user request: its prompt and the n samples generated for it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: list = field(default_factory=list)  # [Request], index = sample_index
    states: dict = field(default_factory=dict)  # sample index -> SampleState
    num_cached_tokens: int = 0
    hold: int = 0  # characters held back: the longest stop string minus one
    # prompt_logprobs: one entry per prompt token (None first), filled as the
    # prefill chunks' steps are read; sent once in delta outputs.
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False


def check_token_stop(req: Request, max_model_len: int) -> bool:
    """EOS / stop_token_ids / max_tokens / max_model_len after a new token;
    sets the request's status and stop reason when it stops."""
    sp = req.sampling_params
    tok = req.all_token_ids[-1]
    n_out = req.num_output_tokens
    if n_out >= sp.min_tokens and tok in sp.all_stop_token_ids:
        req.status = RequestStatus.FINISHED_STOPPED
        req.stop_reason = tok if tok in sp.stop_token_ids else None
        return True
    if n_out >= req.max_tokens or req.num_tokens >= max_model_len:
        req.status = RequestStatus.FINISHED_LENGTH
        return True
    return False


def find_stop(text: str, stops: list[str], prev_len: int):
    """Earliest stop string that ends in the new part of ``text``."""
    best = None
    for s in stops:
        i = text.find(s, max(0, prev_len - len(s) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


class OutputProcessor:
    def __init__(self, tokenizer, scheduler, max_model_len: int):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.requests: dict[str, RequestState] = {}
        self.faults = None  # a test-only FaultInjector (jpaged.engine.faults)

    def add(self, state: RequestState) -> None:
        state.hold = max((len(s) for s in state.params.stop), default=1) - 1
        self.requests[state.request_id] = state

    def pop(self, request_id: str) -> RequestState | None:
        return self.requests.pop(request_id, None)

    def record_prompt_logprobs(self, scheduled, spans, arrays) -> None:
        """Store one step's prompt logprobs (`jpaged.sample.prompt_logprobs`);
        a position computed again after a preemption overwrites its entry."""
        for span in spans:
            req = scheduled[span[0]].request
            state = self.requests.get(req.group_id)
            if state is None:
                continue
            if state.prompt_logprobs is None:
                state.prompt_logprobs = [None] * len(state.prompt_token_ids)
            for idx, entry in position_entries(arrays, span, req.prompt_token_ids,
                                               state.params.prompt_logprobs, self._decode_one):
                state.prompt_logprobs[idx] = entry

    def process(self, updated: list[Request], results: dict) -> list[RequestOutput]:
        """Apply one step's new tokens. ``results[(group_id, sample_index)]`` is
        ``(logprob, rank, top_ids, top_logprobs)`` of that sample's token."""
        now = time.time()
        touched: dict[str, RequestState] = {}
        failed: list[RequestOutput] = []
        for req in updated:
            state = self.requests.get(req.group_id)
            if state is None:
                continue
            if req.sample_index >= len(state.samples):
                state.samples.append(req)
            state.samples[req.sample_index] = req
            m = state.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                m.first_scheduled_time = req.first_scheduled_time
                state.num_cached_tokens = max(req.num_cached_tokens, 0)
            m.last_token_time = now
            try:
                self._process_token(state, req, results.get((req.group_id, req.sample_index)))
            except Exception as e:  # noqa: BLE001 - this request's own fault: it fails alone
                from jpaged.engine.recovery import RequestFailed, fail_request

                touched.pop(state.request_id, None)
                failed.append(fail_request(self, state.request_id, RequestFailed(
                    f"request failed while detokenizing: {type(e).__name__}: {e}")))
                continue
            touched[state.request_id] = state
        outputs = failed
        for state in touched.values():
            finished = len(state.samples) == state.params.n and all(
                r.status.finished for r in state.samples)
            if finished:
                state.metrics.finished_time = now
                state.metrics.num_preemptions = sum(r.num_preemptions for r in state.samples)
                del self.requests[state.request_id]
            out = self.make_output(state, finished)
            if out is not None:
                outputs.append(out)
        return outputs

    def _process_token(self, state: RequestState, req: Request, res) -> None:
        sp = req.sampling_params
        tok = req.all_token_ids[-1]
        if req.first_token_time is None:
            req.first_token_time = time.time()
        st = state.states.get(req.sample_index)
        if st is None:
            st = state.states[req.sample_index] = SampleState(
                IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens))
        if self.faults is not None:
            self.faults.check_detok(state.prompt_token_ids)
        if sp.logprobs is not None:
            lp, rank, top_ids, top_lps = res
            st.cumulative_logprob += lp
            entry = {tok: Logprob(lp, rank, self._decode_one(tok))}
            for r, (tid, tlp) in enumerate(zip(top_ids, top_lps), start=1):
                entry.setdefault(int(tid), Logprob(float(tlp), r, self._decode_one(int(tid))))
            st.logprobs.append(entry)
        stopped = check_token_stop(req, self.max_model_len)
        detok = st.detok
        prev_len = len(detok.text)
        if not (stopped and req.status == RequestStatus.FINISHED_STOPPED
                and not sp.include_stop_str_in_output):
            detok.step(tok)
        if stopped:
            detok.finish()
        text = detok.text
        if sp.stop and not (stopped and req.stop_reason is None
                            and req.status == RequestStatus.FINISHED_STOPPED):
            hit = find_stop(text, sp.stop, prev_len)
            if hit is not None:
                pos, stop = hit
                text = text[:pos + len(stop)] if sp.include_stop_str_in_output else text[:pos]
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = stop
                stopped = True
        st.text = text
        if stopped:
            self.scheduler.finish_requests([req.request_id], req.status)

    def end_early(self, expired: list[Request], refused: list) -> list[RequestOutput]:
        """Final outputs of requests the scheduler ended: ``expired`` (past their
        deadline, with their partial output) and ``refused`` (``(request, error)``,
        never served). Samples of the same request end together."""
        outputs, now = [], time.time()
        errors = {req.group_id: err for req, err in refused}
        for req in list(expired) + [r for r, _ in refused]:
            state = self.requests.get(req.group_id)
            if state is None:
                continue
            rest = [r.request_id for r in state.samples if not r.status.finished]
            for r in state.samples:
                if not r.status.finished:
                    r.status, r.stop_reason = req.status, req.stop_reason
            self.scheduler.finish_requests(rest, req.status)
            del self.requests[state.request_id]
            state.metrics.finished_time = now
            for st in state.states.values():
                st.detok.finish()
                st.text = st.detok.text
            out = self.make_output(state, True)
            out.error = errors.get(req.group_id)
            outputs.append(out)
        return outputs

    def _decode_one(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def make_output(self, state: RequestState, finished: bool) -> RequestOutput | None:
        kind = state.params.output_kind
        if kind == "final_only" and not finished:
            return None
        delta = kind == "delta"
        outs = []
        for req in sorted(state.samples, key=lambda r: r.sample_index):
            sp = req.sampling_params
            st = state.states.get(req.sample_index)
            text = st.text if st is not None else ""
            if state.hold and not req.status.finished:
                text = text[:max(0, len(text) - state.hold)]  # may start a stop string
            n_prompt = req.num_prompt_tokens
            if delta and st is not None:
                tokens = req.all_token_ids[n_prompt + st.sent_tokens:]
                logprobs = st.logprobs[st.sent_tokens:] if sp.logprobs is not None else None
                new_text = text[st.sent_text:]
                st.sent_tokens += len(tokens)
                st.sent_text = max(st.sent_text, len(text))
                text = new_text
            else:
                tokens = req.all_token_ids[n_prompt:]
                logprobs = list(st.logprobs) if st is not None and sp.logprobs is not None \
                    else ([] if sp.logprobs is not None else None)
            outs.append(CompletionOutput(
                index=req.sample_index, text=text, token_ids=tokens,
                cumulative_logprob=(st.cumulative_logprob if st is not None else 0.0)
                if sp.logprobs is not None else None,
                logprobs=logprobs, finish_reason=req.finish_reason, stop_reason=req.stop_reason))
        plp = state.prompt_logprobs
        if plp is not None and delta:
            plp, state.prompt_logprobs_sent = (
                None if state.prompt_logprobs_sent else plp), True
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids, outputs=outs, finished=finished,
            num_cached_tokens=state.num_cached_tokens, metrics=state.metrics,
            prompt_logprobs=plp)

"""Recovery from a failed engine step: the requests of that step fail, the
others go on.

When `LLMEngine.step` raises (a bug, a device error, or a fault injected by
`jpaged.engine.faults`), the device state of the requests it was working on
cannot be trusted: the step's own requests (``engine._step_out``), the
step whose results were not read yet, and every running request are ended
with a `RequestFailed` error (their blocks freed, their batch rows released at
the next step), and the dispatched step is dropped (with requests preempted to host memory, when
the step was to swap). The runner's batch rows are resynchronised with the
scheduler's live requests. Waiting requests that
never ran keep their place. `AsyncLLM` calls `fail_step` and reports the
engine unhealthy until it returns; an engine without it (or a `fail_step`
that raises) is dead. Tested in tests/test_faults.py.
"""

from __future__ import annotations

import time

from jpaged.outputs import RequestOutput
from jpaged.sched import RequestStatus


class RequestFailed(RuntimeError):
    """A request ended by an internal error (HTTP 500): its engine step failed,
    or its own detokenization did."""


def step_groups(out) -> set[str]:
    """The request groups a `SchedulerOutput` (or None) works on."""
    return set() if out is None else {sr.request.group_id for sr in out.scheduled}


def fail_step(engine, err: BaseException) -> list[RequestOutput]:
    """End the requests of the step that raised ``err``; returns their final
    outputs (``error`` set to a `RequestFailed`)."""
    out, sched = engine._step_out, engine.scheduler
    groups = step_groups(out) | {r.group_id for r in sched.running}
    if engine._inflight is not None:
        groups |= step_groups(engine._inflight.out)
    if out is not None and (out.swap_out or out.swap_in):
        # The swaps may not have run: no swapped-out copy can be trusted.
        groups |= {r.group_id for r in sched.requests.values() if r.num_preemptions}
    engine._inflight = engine._step_out = None
    failure = RequestFailed(f"engine step failed: {type(err).__name__}: {err}")
    outs = [fail_request(engine.output, gid, failure) for gid in sorted(groups)
            if gid in engine.output.requests]
    # The step may have raised before the runner saw the rows it freed (and
    # the ones freed here): give back every row no live request holds.
    rows = engine.runner.batch.rows
    engine.runner.release_rows([rid for rid in list(rows) if rid not in sched.requests])
    return outs


def fail_request(output, group_id: str, error: BaseException) -> RequestOutput:
    """End one request group of the `OutputProcessor` ``output`` at once with
    ``error``; its partial output is kept."""
    sched = output.scheduler
    state = output.pop(group_id)
    reqs = state.samples
    if reqs and reqs[0].beam is not None:
        group = reqs[0].beam
        reqs = list(group.beams)
        if group in sched.finished_beam_groups:
            sched.finished_beam_groups.remove(group)
    for r in reqs:
        if not r.status.finished:
            r.status = RequestStatus.FINISHED_ABORTED
    sched.finish_requests([r.request_id for r in reqs],
                                     RequestStatus.FINISHED_ABORTED)
    state.metrics.finished_time = time.time()
    out = output.make_output(state, True)
    out.error = error
    return out

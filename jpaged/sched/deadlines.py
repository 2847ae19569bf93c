"""Deadlines and admission refusals, applied by the `Scheduler` at the start
of each step: a running request past its ``deadline`` ends with its partial
output (``stop_reason="deadline"``; a beam search ends whole, its live beams
becoming its hypotheses), and a waiting one that has no token yet and is past
its deadline, its time-to-first-token deadline or ``max_queue_wait_ms``, or
that the policy's admission control refuses, is refused with a
`RequestRefused`. Tested in tests/test_slo.py and tests/test_beam.py.
"""

from __future__ import annotations

from jpaged.sched.policy import FCFSPolicy, RequestRefused
from jpaged.sched.request import Request, RequestStatus


def _refusal(sched, req: Request, now: float) -> str | None:
    """Why a waiting request without a token must be refused now, if it must."""
    if req.deadline is not None and now >= req.deadline:
        return "its deadline passed while it waited"
    if req.ttft_deadline is not None and now >= req.ttft_deadline:
        return "its time-to-first-token SLO passed while it waited"
    wait = sched.config.max_queue_wait_ms
    if wait is not None and (now - req.arrival_time) * 1000 >= wait:
        return f"it waited max_queue_wait_ms={wait:g}"
    return sched.policy.refuse(req, now)


def apply_deadlines(sched, out, now: float) -> None:
    """End running requests past their deadline; refuse waiting ones that
    cannot make theirs (a preempted one with output ends like a running one)."""
    if not sched._timed and sched.config.max_queue_wait_ms is None \
            and type(sched.policy).refuse is FCFSPolicy.refuse:
        return  # nothing can expire or be refused
    for req in list(sched.running) + list(sched.waiting):
        if req.status.finished:
            continue
        started = req.num_output_tokens + req.num_output_placeholders > 0
        if req.deadline is not None and now >= req.deadline and (
                started or req.status != RequestStatus.WAITING or req.num_preemptions):
            if req.beam is not None:  # the whole search ends, with its best beams so far
                _expire_group(sched, req.beam)
                continue
            req.stop_reason = "deadline"
            sched.finish_requests([req.request_id], RequestStatus.FINISHED_LENGTH)
            out.expired.append(req)
        elif not started and req.status == RequestStatus.WAITING and req.num_preemptions == 0:
            why = _refusal(sched, req, now)
            if why is not None:
                wait = max(sched.estimator.seconds(sched._queued_tokens()), 1.0)
                sched.finish_requests([req.request_id], RequestStatus.FINISHED_ABORTED)
                req.stop_reason = "refused"
                out.refused.append((req, RequestRefused(req.group_id, why, wait)))


def _expire_group(sched, group) -> None:
    """End a beam search past its deadline: its live beams become its
    hypotheses (as an aborted search) and it is listed as finished."""
    group.final_beams = [(b.output_token_ids, b.logprobs, b.cumulative_logprob)
                         for b in group.beams]
    group.pending.clear()
    for b in group.beams:
        b.stop_reason = "deadline"
    sched.finish_requests([b.request_id for b in group.beams], RequestStatus.FINISHED_LENGTH)
    sched.finished_beam_groups.append(group)

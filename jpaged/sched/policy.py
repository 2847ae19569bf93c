"""Scheduling policies: which waiting request runs next, which running one is
preempted, and which are refused at admission.

A policy is a class with this interface (the built-ins `FCFSPolicy`,
`PriorityPolicy` and `SLOPolicy` implement it; a user class is named as
``scheduling_policy="package.module:Class"`` or registered under the entry
point group ``jpaged.scheduling_policies``):

``__init__(self, estimator: PrefillEstimator)``
    ``estimator.seconds(num_tokens)`` predicts how long a prefill of that
    many tokens takes (per-step overhead plus per-token cost, learned from
    the engine's recent steps).
``next_waiting(self, waiting: Sequence[Request], now: float) -> Request``
    The waiting request to admit next (``waiting`` is never empty; preempted
    requests are at its front).
``victim(self, candidates: Sequence[Request], now: float) -> Request``
    The running request to preempt when KV blocks run out (``candidates`` are
    in admission order and never empty).
``refuse(self, req: Request, now: float) -> str | None``
    Called for every waiting request that has not produced a token yet,
    each step; a reason string refuses it (the caller gets `RequestRefused`).

Times are seconds on the scheduler's clock; a request's absolute deadlines
are ``req.deadline`` and ``req.ttft_deadline`` (``None`` when not set).
Deadlines that have already passed, and ``max_queue_wait_ms``, are enforced
by the scheduler for every policy; `refuse` adds policy-specific admission
control.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from jpaged.sched.request import Request


class RequestRefused(RuntimeError):
    """A request was refused because it cannot meet its deadline (or waited
    too long). ``retry_after_s`` is a hint for HTTP's Retry-After."""

    def __init__(self, request_id: str, reason: str, retry_after_s: float = 1.0):
        super().__init__(f"request {request_id} refused: {reason}")
        self.request_id = request_id
        self.reason = reason
        self.retry_after_s = retry_after_s


class PrefillEstimator:
    """How long a prefill takes, learned from the engine's recent steps.

    A step costs a fixed overhead (launch, sampling, host work) plus a cost
    per token it computes; both are fit by least squares to recent steps,
    the last ``per_size`` of each size class (token counts within a power of
    two), so that a run of decode steps (many, small: they pin the overhead)
    does not push the prefill chunks (which give the per-token cost) out of
    the fit. A prefill of ``n`` tokens runs in ``ceil(n / chunk)`` steps of at
    most ``chunk`` tokens (``max_num_batched_tokens``), so it is predicted to
    take that many overheads plus ``n`` tokens' cost. Dividing step time by
    tokens instead charged a short prompt a long step's whole overhead.
    """

    def __init__(self, chunk: int | None = None, per_size: int = 16):
        self.chunk = chunk
        self.per_size = per_size
        self._by_size: dict[int, deque] = {}  # log2 size class -> (tokens, seconds)
        self.overhead = 0.0
        self.seconds_per_token = 0.0

    @property
    def samples(self) -> list:
        return [x for d in self._by_size.values() for x in d]

    @property
    def num_samples(self) -> int:
        return sum(len(d) for d in self._by_size.values())

    def record(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds < 0:
            return
        d = self._by_size.setdefault(int(num_tokens).bit_length(),
                                     deque(maxlen=self.per_size))
        d.append((num_tokens, seconds))
        self._fit(self.samples)

    def _fit(self, samples: list) -> None:
        n = len(samples)
        mx = sum(x for x, _ in samples) / n
        my = sum(y for _, y in samples) / n
        sxx = sum((x - mx) ** 2 for x, _ in samples)
        if sxx <= 1e-9 * max(mx * mx, 1.0):  # one step size seen: no overhead to separate
            self.overhead, self.seconds_per_token = 0.0, my / mx
            return
        slope = sum((x - mx) * (y - my) for x, y in samples) / sxx
        icpt = my - slope * mx
        if slope < 0:  # noise: time does not grow with tokens here
            self.overhead, self.seconds_per_token = my, 0.0
        elif icpt < 0:  # through the origin instead
            self.overhead = 0.0
            self.seconds_per_token = sum(x * y for x, y in samples) / \
                sum(x * x for x, _ in samples)
        else:
            self.overhead, self.seconds_per_token = icpt, slope

    def seconds(self, num_tokens: int) -> float:
        n = max(num_tokens, 0)
        if n == 0:
            return 0.0
        steps = math.ceil(n / self.chunk) if self.chunk else 1
        return steps * self.overhead + n * self.seconds_per_token


def _remaining_prefill(req: Request) -> int:
    return max(req.num_tokens - req.num_computed_tokens, 1)


class FCFSPolicy:
    """First come, first served; the latest admitted request is preempted."""

    def __init__(self, estimator: PrefillEstimator):
        self.estimator = estimator

    def next_waiting(self, waiting: Sequence[Request], now: float) -> Request:
        return waiting[0]

    def victim(self, candidates: Sequence[Request], now: float) -> Request:
        return candidates[-1]

    def refuse(self, req: Request, now: float) -> str | None:
        return None


class PriorityPolicy(FCFSPolicy):
    """Lower ``priority`` first (as vLLM), then arrival; the victim is the
    lowest-priority, latest arrival."""

    def next_waiting(self, waiting, now):
        return min(waiting, key=lambda r: (r.priority, r.arrival_time))

    def victim(self, candidates, now):
        return max(candidates, key=lambda r: (r.priority, r.arrival_time))


class SLOPolicy(FCFSPolicy):
    """Priority, then least slack first; refuses what cannot make its SLO.

    Slack is the time left before a request's nearest deadline (its
    time-to-first-token deadline until it has a token, then its completion
    deadline) minus the estimated time of its remaining prefill. A request
    with no deadline has infinite slack (it runs after those with deadlines
    at its priority, and is preempted first).
    """

    def slack(self, req: Request, now: float) -> float:
        deadlines = [d for d in (req.deadline,
                                 req.ttft_deadline if req.first_token_time is None else None)
                     if d is not None]
        if not deadlines:
            return math.inf
        return min(deadlines) - now - self.estimator.seconds(_remaining_prefill(req))

    def next_waiting(self, waiting, now):
        return min(waiting, key=lambda r: (r.priority, self.slack(r, now), r.arrival_time))

    def victim(self, candidates, now):
        return max(candidates, key=lambda r: (r.priority, self.slack(r, now), r.arrival_time))

    def refuse(self, req, now):
        s = self.slack(req, now)
        if s < 0:
            return (f"cannot meet its deadline: the estimated prefill time leaves "
                    f"{s * 1000:.0f} ms of slack")
        return None


BUILTIN_POLICIES = {"fcfs": FCFSPolicy, "priority": PriorityPolicy, "slo": SLOPolicy}


def resolve_policy(name: str):
    """The policy class named ``name``: a built-in, ``module:Class``, or an entry
    point of group ``jpaged.scheduling_policies``."""
    if name in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[name]
    from jpaged.plugins import load_plugin

    cls = load_plugin("jpaged.scheduling_policies", name, what="scheduling_policy")
    missing = [m for m in ("next_waiting", "victim", "refuse") if not callable(
        getattr(cls, m, None))]
    if missing:
        raise ValueError(f"scheduling_policy={name!r}: {cls!r} lacks {', '.join(missing)} "
                         "(see jpaged.sched.policy)")
    return cls

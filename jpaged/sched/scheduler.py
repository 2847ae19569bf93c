"""Continuous-batching scheduler with a unified token budget.

One step:

1. `schedule` gives each running request its next tokens (1 for decode, a
   chunk for a prefill not yet done) under ``max_num_batched_tokens``, asking
   the `KVCacheManager` for slots. When blocks run out it preempts the
   lowest-priority running request (the latest arrival under FCFS), by
   recompute (free its blocks, prefill again later) or by swapping its blocks
   to host memory.
2. If nothing was preempted, waiting requests are admitted in policy order
   (FCFS, or ``(priority, arrival)``), reusing their longest cached prefix,
   while the budget, ``max_num_seqs`` and the blocks allow.
3. The runner executes the `SchedulerOutput`; `update_from_output` advances
   ``num_computed_tokens``, appends sampled tokens, forks ``n > 1`` prompts
   into siblings, applies token-level stop conditions and frees the blocks
   of finished requests at once.

Stop strings need text, so the engine checks them and calls
`finish_requests`. Tested with the real engine in tests/test_engine.py and
alone in tests/test_scheduler.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from jpaged.cache import KVCacheManager
from jpaged.sched.request import Request, RequestStatus

POLICIES = ("fcfs", "priority")
PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"

    def __post_init__(self):
        if self.scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy={self.scheduling_policy!r} is not supported; "
                             f"choose one of {', '.join(POLICIES)}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode={self.preemption_mode!r} is not supported; "
                             f"choose one of {', '.join(PREEMPTION_MODES)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]
    num_samples: int  # sample rows: 0 mid-prefill, n on the last prefill chunk of an n>1 prompt


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_scheduled_tokens: int = 0
    # Requests whose blocks went back since the last step (runner frees their rows).
    freed_req_ids: list[str] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, host)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, device)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    num_preempted: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._freed: list[str] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------ admission
    def add_request(self, req: Request) -> None:
        n_total = req.num_prompt_tokens + req.max_tokens
        if n_total > self.config.max_model_len:
            raise ValueError(
                f"prompt ({req.num_prompt_tokens} tokens) plus max_tokens ({req.max_tokens}) "
                f"is {n_total}, over max_model_len={self.config.max_model_len}")
        if not self.kv.can_fit_ever(n_total):
            raise ValueError(
                f"request needs {self.kv.num_blocks_needed(n_total)} KV blocks "
                f"({n_total} tokens) but the whole cache has {self.kv.num_blocks - 1}; "
                "raise kv_cache_memory or lower max_tokens")
        if req.sampling_params.n > self.config.max_num_seqs:
            raise ValueError(f"n={req.sampling_params.n} is over max_num_seqs="
                             f"{self.config.max_num_seqs}")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running_seqs(self) -> int:
        return sum(r.num_seqs for r in self.running)

    # ----------------------------------------------------------- scheduling
    def _victim(self, exclude: set[str]) -> Request:
        """Lowest-priority running request not already handed to this step."""
        candidates = [r for r in self.running if r.request_id not in exclude]
        if self.config.scheduling_policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.num_preempted += 1
        if (self.config.preemption_mode == "swap" and not out.swap_in
                and self.kv.can_swap_out(req.request_id)):
            out.swap_out += self.kv.swap_out(req.request_id)
            req.status = RequestStatus.SWAPPED
        else:
            self.kv.free(req.request_id)
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
        self._freed.append(req.request_id)
        self.waiting.appendleft(req)

    def _next_waiting(self) -> Request:
        if self.config.scheduling_policy == "priority":
            return min(self.waiting, key=lambda r: (r.priority, r.arrival_time))
        return self.waiting[0]

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        now = time.time()  # wall clock, as RequestMetrics.arrival_time

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            assert num_new > 0, f"{req.request_id} has nothing to compute"
            while True:
                block_ids = self.kv.allocate_slots(
                    req.request_id, req.all_token_ids, req.num_computed_tokens, num_new,
                    cache_salt=req.cache_salt)
                if block_ids is not None:
                    break
                victim = self._victim(scheduled_ids)
                self._preempt(victim, out)
                if victim is req:
                    break
            if block_ids is None:
                continue  # req was preempted; running shrank, i stays
            self._add_scheduled(out, req, num_new, block_ids, now)
            scheduled_ids.add(req.request_id)
            budget -= num_new
            i += 1

        if out.num_preempted == 0:
            self._schedule_waiting(out, budget, now)
        out.copies = self.kv.take_pending_copies()
        out.freed_req_ids, self._freed = self._freed, []
        return out

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        num_seqs = self.num_running_seqs
        while self.waiting and budget > 0:
            req = self._next_waiting()
            if num_seqs + req.num_seqs > self.config.max_num_seqs:
                break
            if req.status == RequestStatus.SWAPPED:
                if out.swap_out or not self.kv.can_swap_in(req.request_id):
                    break
                out.swap_in += self.kv.swap_in(req.request_id)
                block_ids = self.kv.allocate_slots(
                    req.request_id, req.all_token_ids, req.num_computed_tokens,
                    min(req.num_tokens - req.num_computed_tokens, budget),
                    cache_salt=req.cache_salt)
                if block_ids is None:  # swapped in but no room to grow: run next step
                    block_ids = self.kv.get_block_ids(req.request_id)
                    self.waiting.remove(req)
                    req.status = RequestStatus.RUNNING
                    self.running.append(req)
                    num_seqs += req.num_seqs
                    continue
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            else:
                hit_ids, num_cached = self.kv.get_computed_blocks(
                    req.request_id, req.all_token_ids, req.cache_salt)
                num_new = min(req.num_tokens - num_cached, budget)
                block_ids = self.kv.allocate_slots(
                    req.request_id, req.all_token_ids, num_cached, num_new, hit_ids,
                    cache_salt=req.cache_salt)
                if block_ids is None:
                    break
                req.num_computed_tokens = num_cached
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_cached
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_seqs += req.num_seqs
            self._add_scheduled(out, req, num_new, block_ids, now)
            budget -= num_new

    def _add_scheduled(self, out, req, num_new, block_ids, now) -> None:
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
        done = req.num_computed_tokens + num_new >= req.num_tokens
        out.scheduled.append(ScheduledRequest(
            req, num_new, block_ids, num_samples=(req.num_seqs if done else 0)))
        out.num_scheduled_tokens += num_new

    # --------------------------------------------------------------- update
    def update_from_output(self, out: SchedulerOutput, samples: list[list[int]]) -> list[Request]:
        """Apply a step's sampled tokens. ``samples[i]`` holds the token of each
        sample row of ``out.scheduled[i]`` (empty mid-prefill).

        Returns the requests that got a new token this step (new siblings of an
        ``n > 1`` prompt included), in a stable order.
        """
        updated: list[Request] = []
        for sr, toks in zip(out.scheduled, samples):
            req = sr.request
            if req.status != RequestStatus.RUNNING:
                continue  # finished or aborted while the step ran
            req.num_computed_tokens += sr.num_new_tokens
            if not toks:
                continue
            family = [req]
            if len(toks) > 1:
                family += self._fork(req, len(toks) - 1)
            req.forked = True
            for r, tok in zip(family, toks):
                r.all_token_ids.append(int(tok))
                updated.append(r)
        return updated

    def _fork(self, parent: Request, count: int) -> list[Request]:
        import dataclasses

        children = []
        pos = self.running.index(parent) + 1
        for k in range(1, count + 1):
            child = dataclasses.replace(
                parent, request_id=f"{parent.group_id}#{k}", sample_index=k,
                all_token_ids=list(parent.all_token_ids), forked=True, logprobs=[])
            self.kv.fork(parent.request_id, child.request_id)
            self.requests[child.request_id] = child
            self.running.insert(pos, child)
            pos += 1
            children.append(child)
        return children

    def check_token_stop(self, req: Request) -> bool:
        """EOS / stop_token_ids / max_tokens / max_model_len after a new token."""
        sp = req.sampling_params
        tok = req.all_token_ids[-1]
        n_out = req.num_output_tokens
        if n_out >= sp.min_tokens and tok in sp.all_stop_token_ids:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = tok if tok in sp.stop_token_ids else None
            return True
        if n_out >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """Finish (stop, length, abort) requests wherever they are; frees their blocks."""
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            if not req.status.finished:
                req.status = status
            self.kv.free(rid)
            self._freed.append(rid)

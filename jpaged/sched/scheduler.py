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
3. ``schedule`` advances each scheduled request's ``num_computed_tokens`` at
   once and counts one output placeholder for every request that samples:
   the next step may be scheduled before this step's tokens are known
   (async scheduling). A request whose last token is in flight (it reaches
   ``max_tokens``) or whose ``n > 1`` fork is pending waits for the token.
Deadlines (every policy, `jpaged.sched.deadlines`) are applied at the start
of each step. The policy (`jpaged.sched.policy`) refuses at admission, orders
the waiting queue and picks preemption victims (a beam group's victim is
preempted whole).

4. `update_from_output` appends the sampled tokens (replacing the
   placeholders) and forks ``n > 1`` prompts into siblings. Stop conditions
   are the engine's output processor's; it calls `finish_requests`, which
   frees the blocks at once.
5. Beam groups (`sched/beam.py`): each live beam is a request; a group is
   preempted and admitted as a whole, and waits while a step of its beams is
   in flight (its rows change when that step's choice is known).

Tested with the real engine in tests/test_engine.py and alone in
tests/test_scheduler.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from jpaged.cache import KVCacheManager
from jpaged.sched.deadlines import apply_deadlines
from jpaged.sched.output import ScheduledRequest, SchedulerOutput
from jpaged.sched.policy import BUILTIN_POLICIES, PrefillEstimator, RequestRefused, \
    resolve_policy
from jpaged.sched.request import Request, RequestStatus

POLICIES = tuple(BUILTIN_POLICIES)  # or "module:Class", or an entry point name
PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"
    max_queue_wait_ms: float | None = None  # refuse requests waiting longer (no token yet)

    def __post_init__(self):
        resolve_policy(self.scheduling_policy)  # raises ValueError naming the value
        if self.max_queue_wait_ms is not None and not self.max_queue_wait_ms > 0:
            raise ValueError(f"max_queue_wait_ms={self.max_queue_wait_ms} must be positive")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode={self.preemption_mode!r} is not supported; "
                             f"choose one of {', '.join(PREEMPTION_MODES)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, clock=time.time):
        self.config = config
        self.kv = kv
        # The clock of arrival times and deadlines (tests inject a fake one).
        self.clock = clock
        self.estimator = PrefillEstimator(chunk=config.max_num_batched_tokens)
        self.policy = resolve_policy(config.scheduling_policy)(self.estimator)
        self._timed = False  # some request ever had a deadline
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._freed: list[str] = []
        self._in_batch: set[str] = set()  # scheduled since they last joined the batch
        self.num_preemptions = 0
        self.finished_beam_groups: list = []  # searches done since the engine last looked
        self._groups_this_step: set[int] = set()  # ids of beam groups scheduled in this step

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
        if req.beam is not None:
            w = req.sampling_params.num_beams
            if w > self.config.max_num_seqs:
                raise ValueError(f"num_beams={w} is over max_num_seqs={self.config.max_num_seqs}")
            # After a recompute preemption without prefix caching, every beam
            # holds its own copy of the prompt: the group must fit unshared.
            if not self.kv.can_fit_ever(w * self.kv.block_size
                                        * self.kv.num_blocks_needed(n_total)):
                raise ValueError(
                    f"num_beams={w} beams of {n_total} tokens need up to "
                    f"{w * self.kv.num_blocks_needed(n_total)} KV blocks but the whole cache "
                    f"has {self.kv.num_blocks - 1}; raise kv_cache_memory or lower max_tokens")
        why = self.policy.refuse(req, self.clock())
        if why is not None:
            raise RequestRefused(req.group_id, why, max(
                self.estimator.seconds(self._queued_tokens()), 1.0))
        self._timed |= req.deadline is not None or req.ttft_deadline is not None
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running_seqs(self) -> int:
        return sum(r.num_seqs for r in self.running)

    # ----------------------------------------------------------- scheduling
    def _waits_for_token(self, req: Request) -> bool:
        """Whether ``req`` must wait for its in-flight token before it can run:
        its ``n > 1`` fork is pending, or that token is its last; a beam
        waits while its group has a step in flight or for its group's choice."""
        if req.beam is not None:
            return req.beam.waits(req, self._groups_this_step)
        if not req.num_output_placeholders:
            return False
        if not req.forked:
            return True
        return (req.num_output_tokens + req.num_output_placeholders >= req.max_tokens
                or req.num_tokens + req.num_output_placeholders >= self.config.max_model_len)

    def _victim(self, exclude: set[str]) -> Request | None:
        """Lowest-priority running request not already handed to this step
        (never one whose fork is pending: its siblings need its blocks; never
        a beam of a group in flight or partly handed to this step)."""
        candidates = [r for r in self.running if r.request_id not in exclude
                      and (r.forked or not r.num_output_placeholders)
                      and (r.beam is None or not (r.beam.in_flight() or any(
                          b.request_id in exclude for b in r.beam.beams)))]
        if not candidates:
            return None
        return self.policy.victim(candidates, self.clock())

    def _preempt_group(self, req: Request, out: SchedulerOutput) -> None:
        """Preempt ``req``, or its whole beam group: swapped only if every beam
        can be and none holds candidates (their KV would be needed to fork),
        else recomputed."""
        if req.beam is None:
            return self._preempt(req, out)
        group = req.beam
        beams = [b for b in group.beams if b.status == RequestStatus.RUNNING]
        need = sum(len(self.kv.get_block_ids(b.request_id)) for b in beams)
        swap = (not group.pending and all(self.kv.get_block_ids(b.request_id) for b in beams)
                and need <= self.kv.num_host_blocks - self.kv.num_used_host_blocks)
        group.forget_candidates()
        for b in reversed(beams):
            self._preempt(b, out, swap)

    def _preempt(self, req: Request, out: SchedulerOutput, swap: bool = True) -> None:
        self.running.remove(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.num_preempted += 1
        if (swap and self.config.preemption_mode == "swap" and not out.swap_in
                and self.kv.can_swap_out(req.request_id)):
            out.swap_out += self.kv.swap_out(req.request_id)
            req.status = RequestStatus.SWAPPED
        else:
            self.kv.free(req.request_id)
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
        self._freed.append(req.request_id)
        self._in_batch.discard(req.request_id)
        self.waiting.appendleft(req)

    def _next_waiting(self) -> Request:
        return self.policy.next_waiting(self.waiting, self.clock())

    def _queued_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        now = self.clock()
        apply_deadlines(self, out, now)

        self._groups_this_step = set()
        # A snapshot: preemption (of a whole beam group, too) removes entries.
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING or self._waits_for_token(req):
                continue
            num_new = min(req.num_tokens + req.num_output_placeholders
                          - req.num_computed_tokens, budget)
            assert num_new > 0, f"{req.request_id} has nothing to compute"
            if req.encoder_len and not _covers_encoder(req, req.num_computed_tokens, num_new):
                continue
            while True:
                block_ids = self.kv.allocate_slots_delta(
                    req.request_id, req.all_token_ids, req.num_computed_tokens, num_new,
                    cache_salt=req.cache_salt)
                if block_ids is not None:
                    break
                victim = self._victim(scheduled_ids)
                if victim is None:  # only beams of req's own, partly scheduled group
                    break
                self._preempt_group(victim, out)
                if req.status != RequestStatus.RUNNING:
                    break
            if block_ids is None:
                continue  # req was preempted, or runs next step
            self._add_scheduled(out, req, num_new, block_ids, now)
            scheduled_ids.add(req.request_id)
            if req.beam is not None:
                self._groups_this_step.add(id(req.beam))
            budget -= num_new

        self._groups_this_step = set()
        if out.num_preempted == 0:
            self._schedule_waiting(out, budget, now)
        out.copies = self.kv.take_pending_copies()
        out.freed_req_ids, self._freed = self._freed, []
        return out

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        num_seqs = self.num_running_seqs
        while self.waiting and budget > 0:
            req = self._next_waiting()
            seqs = req.num_seqs if req.beam is None else req.beam.width
            if num_seqs + seqs > self.config.max_num_seqs:
                break
            if req.num_output_placeholders:
                break  # preempted with a token in flight: it returns once that is known
            if req.beam is not None:
                admitted = self._admit_group(req.beam, out, budget, now)
                if admitted is None:
                    break
                num_seqs += req.beam.width
                budget -= admitted
                continue
            if req.status == RequestStatus.SWAPPED:
                if out.swap_out or not self.kv.can_swap_in(req.request_id):
                    break
                out.swap_in += self.kv.swap_in(req.request_id)
                block_ids = self.kv.allocate_slots_delta(
                    req.request_id, req.all_token_ids, req.num_computed_tokens,
                    min(req.num_tokens - req.num_computed_tokens, budget),
                    cache_salt=req.cache_salt)
                if block_ids is None:  # swapped in but no room to grow: run next step
                    self.waiting.remove(req)
                    req.status = RequestStatus.RUNNING
                    self.running.append(req)
                    num_seqs += req.num_seqs
                    continue
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            else:
                if req.sampling_params.prompt_logprobs is not None and \
                        not req.num_output_tokens:
                    # Cached positions would skip their prompt logprobs: recompute.
                    hit_ids, num_cached = [], 0
                else:
                    hit_ids, num_cached = self.kv.get_computed_blocks(
                        req.request_id, req.all_token_ids, req.cache_salt)
                num_new = min(req.num_tokens - num_cached, budget)
                if req.encoder_len and not _covers_encoder(req, num_cached, num_new):
                    break  # its encoder waits for a step with room for all of it
                block_ids = self.kv.allocate_slots_delta(
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

    def _admit_group(self, group, out: SchedulerOutput, budget: int, now: float) -> int | None:
        """Bring every waiting beam of ``group`` back, or none (a group runs
        only whole): all their blocks must fit now. Beams past the token
        budget join the running list and compute from the next step.

        Returns the tokens scheduled, or None if the group does not fit."""
        beams = [b for b in self.waiting if b.beam is group]
        swapped = beams[0].status == RequestStatus.SWAPPED
        if swapped:
            # Their blocks, and one more each for the token they compute next.
            need = sum(len(self.kv.req_to_host_blocks.get(b.request_id, ())) + 1 for b in beams)
            if out.swap_out or need > self.kv.num_free_blocks:
                return None
        else:
            hits = {b.request_id: self.kv.get_computed_blocks(
                b.request_id, b.all_token_ids, b.cache_salt) for b in beams}
            revived = {i for ids, _ in hits.values() for i in ids
                       if self.kv.pool.blocks[i].ref_cnt == 0}
            need = len(revived) + sum(self.kv.num_blocks_needed(b.num_tokens) - len(ids)
                                      for b, (ids, _) in zip(beams, hits.values()))
            if need > self.kv.num_free_blocks:
                return None
        used = 0
        for b in beams:
            self.waiting.remove(b)
            if swapped:
                out.swap_in += self.kv.swap_in(b.request_id)
                num_cached, hit_ids = b.num_computed_tokens, ()
            else:
                # Asked again: another beam's new blocks may have evicted a
                # free cached one (which then costs one new block, as counted).
                hit_ids, num_cached = self.kv.get_computed_blocks(
                    b.request_id, b.all_token_ids, b.cache_salt)
                b.num_computed_tokens = num_cached
                if b.num_cached_tokens < 0:
                    b.num_cached_tokens = num_cached
            num_new = min(b.num_tokens - num_cached, budget - used)
            if b.encoder_len and not _covers_encoder(b, num_cached, num_new):
                num_new = 0  # computes from a later step, encoder whole
            block_ids = self.kv.allocate_slots_delta(
                b.request_id, b.all_token_ids, num_cached, num_new, hit_ids,
                cache_salt=b.cache_salt)
            assert block_ids is not None, "the group's blocks were counted"
            b.status = RequestStatus.RUNNING
            self.running.append(b)
            if num_new:
                self._add_scheduled(out, b, num_new, block_ids, now)
                used += num_new
        return used

    def _add_scheduled(self, out, req, num_new, block_ids, now) -> None:
        """Hand ``req`` to this step: advance its computed tokens now (the next
        step may be scheduled before this one's tokens are read) and count the
        token it will sample."""
        if req.first_scheduled_time is None:
            req.first_scheduled_time = now
        joined = req.request_id not in self._in_batch
        if joined:  # the runner fills the whole row
            self._in_batch.add(req.request_id)
            block_offset, block_ids = 0, self.kv.get_block_ids(req.request_id)
        else:
            block_offset, block_ids = block_ids
        start = req.num_computed_tokens
        req.num_computed_tokens += num_new
        done = req.num_computed_tokens >= req.num_tokens + req.num_output_placeholders
        if done:
            req.num_output_placeholders += 1
        out.scheduled.append(ScheduledRequest(
            req, num_new, block_offset, block_ids,
            num_samples=(1 if req.beam is not None else req.num_seqs) if done else 0,
            start=start, joined=joined))
        out.num_scheduled_tokens += num_new

    # --------------------------------------------------------------- update
    def update_from_output(self, out: SchedulerOutput, samples: list[list[int]],
                           beam_candidates=None) -> list[Request]:
        """Apply a step's sampled tokens. ``samples[i]`` holds the token of each
        sample row of ``out.scheduled[i]`` (empty mid-prefill).

        Returns the requests that got a new token (new siblings of an ``n > 1``
        prompt included), in a stable order. A request that finished or was
        aborted since the step was scheduled gets nothing; one preempted since
        still gets its token (it is part of the sequence it will recompute).
        A beam gets no token here: ``beam_candidates[i]`` (its best next
        tokens and their logprobs) goes to its group, which chooses the next
        beams once every beam has its candidates (finished searches are then
        listed in ``finished_beam_groups``).
        """
        updated: list[Request] = []
        for i, (sr, toks) in enumerate(zip(out.scheduled, samples)):
            req = sr.request
            if not toks or req.status.finished:
                continue
            req.num_output_placeholders -= 1
            assert req.num_output_placeholders >= 0, req.request_id
            if req.beam is not None:
                group = req.beam
                group.record(req, *beam_candidates[i])
                if group.ready():
                    group.advance(self)
                    if group.state.done:
                        self.finished_beam_groups.append(group)
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
            self._in_batch.discard(rid)


def _covers_encoder(req: Request, start: int, num_new: int) -> bool:
    """Whether a chunk of ``num_new`` tokens from ``start`` keeps an
    encoder-decoder request's encoder tokens in one step: it starts past
    them, or takes them all."""
    return start >= req.encoder_len or start + num_new >= req.encoder_len

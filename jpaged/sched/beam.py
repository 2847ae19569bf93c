"""Beam groups: the live beams of one beam-search request, as scheduler rows.

A request with ``num_beams = W > 1`` starts as one `Request` (the prompt).
Each live beam is a `Request` of its own, decoded in the same steps as
everything else. Its step returns its best next tokens instead of a sample
(`record`); once every live beam of the group has them (`ready`), `advance`
runs the search step (`sample/beam_search.py`) and re-forms the group: the
first new beam drawn from a beam extends that beam in place, every further
one is a fork (a copy of its block-table row, the blocks' ref counts raised,
copy-on-write for the partly filled last block only), and beams no new beam
comes from are finished, which frees their blocks. The group is scheduled,
admitted and preempted as a whole (`Scheduler`), and never while a step of
its beams is in flight: its rows change when that step's choice is known.
"""

from __future__ import annotations

import dataclasses

from jpaged.sample.beam_search import BeamSearchState
from jpaged.sched.request import Request, RequestStatus


class BeamGroup:
    def __init__(self, root: Request):
        sp = root.sampling_params
        self.group_id = root.group_id
        self.width = sp.num_beams
        self.state = BeamSearchState(
            width=sp.num_beams, max_tokens=root.max_tokens, length_penalty=sp.length_penalty,
            early_stopping=sp.early_stopping, eos_ids=frozenset(sp.all_stop_token_ids))
        self.beams: list[Request] = [root]  # live, best first
        self.pending: dict[str, tuple] = {}  # request id -> (token ids, logprobs) of its step
        self._num_forks = 0
        self.root = root
        self.num_preemptions = 0
        root.beam = self

    # ------------------------------------------------------------ status
    def in_flight(self) -> bool:
        """A step holding some beam is dispatched but not read back."""
        return any(b.num_output_placeholders for b in self.beams)

    def waits(self, req: Request, scheduling: set[int] = frozenset()) -> bool:
        """``req`` cannot run now: the group has a step in flight (other than
        the one being scheduled, whose ids are ``scheduling``), or ``req`` has
        its next-token candidates and waits for the other beams'."""
        if req.request_id in self.pending:
            return True
        return id(self) not in scheduling and self.in_flight()

    def num_seqs(self, req: Request) -> int:
        """The group reserves ``width`` rows (it grows back to ``width`` after
        any step), counted on its best beam."""
        return self.width if req is self.beams[0] else 0

    def record(self, req: Request, token_ids, logprobs) -> None:
        self.pending[req.request_id] = (token_ids, logprobs)

    def ready(self) -> bool:
        return len(self.pending) == len(self.beams)

    def forget_candidates(self) -> None:
        """Preemption: candidates are recomputed with the beams' KV."""
        self.pending.clear()
        self.num_preemptions += 1

    # ----------------------------------------------------------- a step
    def advance(self, sched) -> None:
        """Choose the next live beams from every beam's candidates; forks,
        extends and frees beams through ``sched`` (the `Scheduler`)."""
        beams = self.beams
        cands = [self.pending[b.request_id] for b in beams]
        self.pending.clear()
        choices = self.state.step(
            [(b.output_token_ids, b.logprobs, b.cumulative_logprob) for b in beams], cands)
        used: set[int] = set()
        targets = []
        for c in choices:  # forks copy their source before any source is extended
            src = beams[c.source]
            if c.source in used:
                targets.append((self._fork(src, sched), c))
            else:
                used.add(c.source)
                targets.append((src, c))
        dropped = [b.request_id for i, b in enumerate(beams) if i not in used]
        if self.state.done:
            self.final_beams = [(b.output_token_ids, b.logprobs, b.cumulative_logprob)
                                for b in beams]
        sched.finish_requests(dropped, RequestStatus.FINISHED_STOPPED)
        for beam, c in targets:
            beam.all_token_ids.append(c.token)
            beam.logprobs.append(c.logprob)
            beam.cumulative_logprob = c.cum_logprob
            beam.forked = True
        self.beams = [b for b, _ in targets]

    def _fork(self, src: Request, sched) -> Request:
        self._num_forks += 1
        child = dataclasses.replace(
            src, request_id=f"{self.group_id}#beam{self._num_forks}",
            all_token_ids=list(src.all_token_ids), logprobs=list(src.logprobs), forked=True)
        sched.kv.fork(src.request_id, child.request_id)
        sched.requests[child.request_id] = child
        sched.running.insert(sched.running.index(src) + 1, child)
        return child

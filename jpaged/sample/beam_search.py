"""Beam search bookkeeping on the host, scored as transformers does.

The device hands back, for every live beam, its best ``K`` next tokens and
their (processed) logprobs (`sampler.beam_candidates`: the reduction over the
vocabulary is on the device; ``K = max(2, 1 + #eos) * width``, so the union
of the per-beam lists holds the group's best ``K`` over ``width x vocab``).
`BeamSearchState.step` merges those ``width`` short lists into the group's
top ``K`` and applies transformers' rules: a candidate that ends (an EOS id,
or ``max_tokens`` reached) becomes a finished hypothesis only when it ranks
inside the top ``width``, scored ``cum_logprob / generated_len **
length_penalty``; the best ``width`` unfinished candidates live on; the
search stops as ``early_stopping`` says (True: ``width`` finished hypotheses;
False: the best live beam, at its current length, cannot beat the worst
finished one; "never": the same at the longest possible length when
``length_penalty > 0``). Pure Python; tested against transformers
``generate(num_beams=...)`` in tests/test_beam.py.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

# Static per-row candidate count of the jitted step (a shape): K above must fit.
MAX_BEAM_CANDIDATES = 32
EARLY_STOPPING = (True, False, "never")


def num_candidates(width: int, num_eos: int) -> int:
    """Candidates kept per step: enough that ``width`` live beams remain even
    if the best ``width`` all end (transformers' ``beams_to_keep``)."""
    return max(2, 1 + num_eos) * width


@dataclass(slots=True)
class Hypothesis:
    """A finished beam: its generated tokens and their logprobs."""

    tokens: list[int]  # generated tokens, the ending one included
    logprobs: list[float]
    cum_logprob: float
    score: float  # cum_logprob / len(tokens) ** length_penalty
    finish_reason: str  # "stop" (an EOS or stop id) or "length"


@dataclass(slots=True)
class Choice:
    """A live beam of the next step: ``source`` (index of the beam it extends) + ``token``."""

    source: int
    token: int
    logprob: float
    cum_logprob: float


@dataclass(slots=True)
class BeamSearchState:
    width: int
    max_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_ids: frozenset = frozenset()
    finished: list[Hypothesis] = field(default_factory=list)  # best first, <= width
    improvable: bool = True  # transformers' "early stop heuristic unsatisfied"
    done: bool = False

    @property
    def num_candidates(self) -> int:
        return num_candidates(self.width, len(self.eos_ids))

    def step(self, beams, candidates) -> list[Choice]:
        """One beam-search step.

        Args:
          beams: per live beam ``(generated_tokens, logprobs, cum_logprob)``;
            every beam has generated the same number of tokens.
          candidates: per live beam ``(token_ids, logprobs)``, its best tokens
            by processed logprob, best first (at least ``num_candidates``).

        Returns:
          The live beams of the next step, best first (empty once `done`).
        """
        k, w = self.num_candidates, self.width
        gen_len = len(beams[0][0])
        # Group top-K over width x vocab from the per-beam top-K lists; ties
        # go to the lower flat index (beam * V + token), as torch.topk on CPU.
        flat = ((float(cum + lp), b, int(t), float(lp))
                for b, ((_, _, cum), (ids, lps)) in enumerate(zip(beams, candidates))
                for t, lp in zip(ids[:k], lps[:k]))
        top = heapq.nsmallest(k, flat, key=lambda c: (-c[0], c[1], c[2]))
        n_new = gen_len + 1
        at_length = n_new >= self.max_tokens
        full = len(self.finished) >= w
        live: list[Choice] = []
        new_finished = []
        all_end = True
        for rank, (score, b, tok, lp) in enumerate(top):
            ends = at_length or tok in self.eos_ids
            all_end &= ends
            if not ends:
                if len(live) < w:
                    live.append(Choice(b, tok, lp, score))
                continue
            # Only the top `width` may finish; the rest of K is a reserve of live beams.
            if rank < w and self.improvable and not (full and self.early_stopping is True):
                toks, lps, _ = beams[b]
                new_finished.append(Hypothesis(
                    list(toks) + [tok], list(lps) + [lp], score,
                    score / (n_new ** self.length_penalty),
                    "length" if tok not in self.eos_ids else "stop"))
        if new_finished:
            merged = self.finished + new_finished  # stable: older wins a tie
            self.finished = sorted(merged, key=lambda h: -h.score)[:w]
        # Can a live beam still beat the worst finished hypothesis?
        if live and len(self.finished) >= w:
            if self.early_stopping == "never" and self.length_penalty > 0:
                best_len = self.max_tokens
            else:
                best_len = n_new
            best = live[0].cum_logprob / (best_len ** self.length_penalty)
            self.improvable &= best > self.finished[-1].score
        self.done = (not self.improvable or not live or all_end
                     or (self.early_stopping is True and len(self.finished) >= w))
        return [] if self.done else live

    def best(self, count: int, beams=()) -> list[Hypothesis]:
        """The best ``count`` hypotheses; live ``beams`` (``(tokens, logprobs,
        cum)``, best first) fill in when fewer have finished (an aborted search)."""
        out = list(self.finished[:count])
        for toks, lps, cum in beams:
            if len(out) >= count:
                break
            n = max(len(toks), 1)
            out.append(Hypothesis(list(toks), list(lps), cum, cum / n ** self.length_penalty,
                                  "length"))
        return out

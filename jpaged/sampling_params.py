"""`SamplingParams`: how one request samples and when it stops (vLLM's fields).

Every value is checked when the object is built; a bad one raises
`ValueError` naming the field and the value, so that neither `LLM.generate`
nor the server ever hands the engine something it cannot run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_MAX_SEED = 2**63 - 1
_INT32 = 2**31
# Far above any useful value (at 100 sampling is already near uniform), and
# far below float32's range: logits are divided by it in float32, where an
# overflow to inf would turn banned tokens' -inf into NaN (and NaN wins argmax).
MAX_TEMPERATURE = 100.0
OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclass
class SamplingParams:
    """Sampling and stopping parameters for one request.

    ``temperature=0`` is greedy. ``top_k=0`` (or -1) and ``top_p=1`` disable
    those filters; ``min_p=0`` disables min-p. ``logprobs=k`` returns the top
    ``k`` alternatives of every sampled token (capped by the engine's
    ``max_logprobs``).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    # Per prompt position after the first: the prompt token's logprob and rank
    # and the top ``prompt_logprobs`` alternatives (RequestOutput.prompt_logprobs).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # What each RequestOutput carries (vLLM's RequestOutputKind): "cumulative"
    # (all so far), "delta" (only what is new) or "final_only" (one at the end).
    output_kind: str = "cumulative"
    # Service levels, in ms from arrival: finish by deadline_ms (a running
    # request past it ends with its partial output, stop_reason "deadline"; a
    # waiting one is refused) and produce the first token by ttft_slo_ms.
    deadline_ms: float | None = None
    ttft_slo_ms: float | None = None
    # Logits processors (jpaged.sample.logits_processors): OpenAI's logit_bias
    # ({token id: bias in [-100, 100]}), vLLM's allowed_token_ids and
    # bad_words (strings), and registered user processors by name -> argument.
    logit_bias: dict | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logits_processors: dict | None = None
    # Filled by the engine: each enabled processor's packed row parameters.
    processor_rows: dict = field(default_factory=dict, repr=False)
    # Beam search (transformers' names): num_beams > 1 runs a beam search of
    # that width and returns its best num_return_sequences hypotheses.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    reuse_kv_cache: bool = True  # beams always share KV blocks; False is refused
    # Filled by the engine: the model's EOS ids (unless ignore_eos).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._check()

    def _check(self):
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {why}")

        def number(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
            return v

        def integer(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "must be an integer")
            return v

        if integer("n") < 1:
            bad("n", "must be at least 1")
        if not 0 <= number("temperature") <= MAX_TEMPERATURE:
            bad("temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
        if not 0 < number("top_p") <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= integer("top_k") < _INT32:
            bad("top_k", "must be 0 or -1 (disabled) or a positive 32-bit integer")
        if not 0 <= number("min_p") <= 1:
            bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                bad(name, "must be in [-2, 2]")
        if not 0 < number("repetition_penalty") <= 10:
            bad("repetition_penalty", "must be in (0, 10]")
        if self.seed is not None and not 0 <= integer("seed") <= _MAX_SEED:
            bad("seed", f"must be in [0, {_MAX_SEED}]")
        if self.max_tokens is not None and not 1 <= integer("max_tokens") < _INT32:
            bad("max_tokens", "must be a positive 32-bit integer")
        if not 0 <= integer("min_tokens") < _INT32:
            bad("min_tokens", "must be a non-negative 32-bit integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens={self.max_tokens}")
        if self.logprobs is not None and not 0 <= integer("logprobs"):
            bad("logprobs", "must be >= 0")
        if self.prompt_logprobs is not None and not 0 <= integer("prompt_logprobs"):
            bad("prompt_logprobs", "must be >= 0")
        for name in ("deadline_ms", "ttft_slo_ms"):
            if getattr(self, name) is not None and not number(name) > 0:
                bad(name, "must be a positive number of milliseconds")
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            bad("logit_bias", "must map token ids to biases")
        if self.allowed_token_ids is not None and not isinstance(self.allowed_token_ids,
                                                                 (list, tuple)):
            bad("allowed_token_ids", "must be a list of token ids")
        if self.bad_words is not None and not (
                isinstance(self.bad_words, (list, tuple))
                and all(isinstance(w, str) and w for w in self.bad_words)):
            bad("bad_words", "must be a list of non-empty strings")
        if self.logits_processors is not None and not (
                isinstance(self.logits_processors, dict)
                and all(isinstance(k, str) for k in self.logits_processors)):
            bad("logits_processors", "must map processor names to their arguments")
        if self.output_kind not in OUTPUT_KINDS:
            bad("output_kind", f"must be one of {', '.join(OUTPUT_KINDS)}")
        self._check_beams(bad, number, integer)
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < _INT32
                   for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative 32-bit integers")

    def _check_beams(self, bad, number, integer):
        from jpaged.sample.beam_search import EARLY_STOPPING

        if integer("num_beams") < 1:
            bad("num_beams", "must be at least 1")
        number("length_penalty")
        if not any(self.early_stopping is v or self.early_stopping == v and isinstance(v, str)
                   for v in EARLY_STOPPING):
            bad("early_stopping", "must be True, False or 'never'")
        if not 1 <= integer("num_return_sequences") <= self.num_beams:
            bad("num_return_sequences", f"must be in [1, num_beams={self.num_beams}]")
        if self.reuse_kv_cache is not True:
            bad("reuse_kv_cache", "beams always share their KV blocks")
        if self.num_beams == 1:
            return
        if self.n != 1:
            bad("n", "must be 1 with num_beams > 1 (use num_return_sequences)")
        if self.top_k or self.top_p < 1 or self.min_p:
            bad("num_beams", "beam search takes no top_k, top_p or min_p")
        if self.stop:
            bad("stop", "beam search stops on EOS and stop_token_ids only")
        if self.presence_penalty or self.frequency_penalty:
            bad("num_beams", "beam search takes repetition_penalty, not presence or "
                "frequency penalties")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def clone(self) -> "SamplingParams":
        import copy

        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """`LLM.beam_search` parameters (vLLM's fields, plus transformers'
    ``early_stopping``): ``beam_width`` beams, ``max_tokens`` new tokens
    each; ``temperature`` scales the logits the beams are scored by."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        self.sampling_params()  # checks every field now

    def sampling_params(self) -> SamplingParams:
        """The equivalent `SamplingParams`: every beam returned, logprobs kept."""
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) \
                or self.beam_width < 1:
            raise ValueError(f"beam_width={self.beam_width!r} is invalid: must be a positive "
                             "integer")
        return SamplingParams(
            num_beams=self.beam_width, num_return_sequences=self.beam_width,
            max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
            temperature=self.temperature, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
            include_stop_str_in_output=self.include_stop_str_in_output, logprobs=0,
            output_kind="final_only")

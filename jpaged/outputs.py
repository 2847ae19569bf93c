"""What generation returns: `RequestOutput` with one `CompletionOutput` per sample.

Field names follow vLLM so that code written against ``vllm.LLM`` reads the
same results here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank in the distribution
    decoded_token: str | None = None


# Per generated token: {token_id: Logprob} for the sampled token and the top-k.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None
    stop_reason: int | str | None = None  # the stop string or token id that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # SamplingParams.prompt_logprobs: None for the first prompt token, then per
    # position {token_id: Logprob} of the prompt token and the top-k.
    prompt_logprobs: list | None = None
    # Set when the request ended without being served: the `RequestRefused`
    # (cannot meet its deadline; AsyncLLM raises it to the caller).
    error: Exception | None = field(default=None)


@dataclass(slots=True)
class BeamSearchSequence:
    """One hypothesis of `LLM.beam_search` (vLLM's fields): ``tokens`` are the
    prompt's and the generated ones; ``score`` is the ranking score,
    ``cum_logprob / generated_len ** length_penalty``."""

    tokens: list[int]
    logprobs: SampleLogprobs
    cum_logprob: float
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    score: float = 0.0


@dataclass(slots=True)
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first

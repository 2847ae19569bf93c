"""`Request`: the scheduler's host record of one sequence being generated.

A user request with ``n > 1`` becomes ``n`` `Request`s: sample 0 carries the
prompt's prefill and, once it is done, is forked into siblings that share
its KV blocks (copy-on-write). ``group_id`` is the user's request id.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from jpaged.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted by swap: KV in host memory, waiting to return
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True)
class Request:
    request_id: str
    group_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    seed: int  # the request's own sampling seed (user's or drawn by the engine)
    priority: int = 0
    cache_salt: str | None = None
    sample_index: int = 0
    max_tokens: int = 16  # resolved against max_model_len
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens sampled by steps already dispatched but not read back yet (async
    # scheduling): the next step's input for this request is on the device.
    num_output_placeholders: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first schedule; -1 = not yet
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    forked: bool = False  # True once the n-1 siblings exist
    beam: object = None  # the BeamGroup (sched/beam.py) this live beam belongs to
    # Sampling record
    cumulative_logprob: float = 0.0
    logprobs: list = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Absolute times on the scheduler's clock: finish by ``deadline``, first
    # token by ``ttft_deadline`` (SamplingParams.deadline_ms / ttft_slo_ms).
    deadline: float | None = None
    ttft_deadline: float | None = None
    # Encoder-decoder models: the first encoder_len prompt tokens are the
    # encoder's, which one step must compute together (jpaged.models.bart).
    encoder_len: int = 0

    def __post_init__(self):
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def num_seqs(self) -> int:
        """Sequences this request will occupy: n for a prompt not yet forked;
        a beam group's width, counted on its best beam."""
        if self.beam is not None:
            return self.beam.num_seqs(self)
        return 1 if self.forked else self.sampling_params.n

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

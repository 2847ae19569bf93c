"""What one `Scheduler.schedule` call hands the runner: `SchedulerOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field

from jpaged.sched.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    # Block-table change of this request: entries from column ``block_offset``
    # on are ``block_ids``. A request that (re)joins the batch gets its whole
    # row (offset 0); a running one only its newly allocated or copied-on-write
    # blocks, so this list does not grow with the request's length.
    block_offset: int
    block_ids: list[int]
    num_samples: int  # sample rows: 0 mid-prefill, n on the last prefill chunk of an n>1 prompt
    start: int = 0  # position of the first scheduled token (num_computed_tokens before)
    joined: bool = False  # first step since admission or resume: the runner fills its row


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
    # Past their deadline: running ones ended with their partial output
    # (finish_reason "length", stop_reason "deadline"); waiting ones without a
    # token refused, each with its `RequestRefused`.
    expired: list[Request] = field(default_factory=list)
    refused: list[tuple[Request, Exception]] = field(default_factory=list)

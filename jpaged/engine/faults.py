"""Test-only fault injection: faults the engine raises on purpose so that tests
can check what a real fault would do (tests/test_faults.py, scripts/soak.py).

Enabled only by the environment variable ``JPAGED_TEST_FAULTS`` (or the
``faults`` argument of `LLMEngine`), which no production code path sets; it
is read once when the engine is built. Its value is JSON with any of:
``step_token`` (a step raises `InjectedFault` when it schedules a request
whose prompt holds this token id), ``detok_token`` (detokenizing a token of a
request whose prompt holds this id raises) and ``hold_s`` (after a failed
step the engine loop stays down, reporting unhealthy, this many seconds
before it goes on, so that a test can see the outage). Prompts are
token-id lists in the tests, so the poison tokens are chosen exactly.
"""

from __future__ import annotations

import json
import os

ENV = "JPAGED_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """A fault raised on purpose by `FaultInjector`."""


class FaultInjector:
    def __init__(self, step_token: int | None = None, detok_token: int | None = None,
                 hold_s: float = 0.0):
        self.step_token, self.detok_token, self.hold_s = step_token, detok_token, hold_s
        self.step_faults = 0
        self.detok_faults = 0

    @classmethod
    def from_env(cls) -> "FaultInjector | None":
        raw = os.environ.get(ENV)
        if not raw:
            return None
        spec = json.loads(raw)
        unknown = set(spec) - {"step_token", "detok_token", "hold_s"}
        if unknown:
            raise ValueError(f"{ENV}: unknown keys {sorted(unknown)}")
        return cls(**spec)

    def check_step(self, scheduled) -> None:
        """Raise if a scheduled request (``ScheduledRequest``s) is poisoned."""
        if self.step_token is None:
            return
        for sr in scheduled:
            if self.step_token in sr.request.prompt_token_ids:
                self.step_faults += 1
                raise InjectedFault(f"injected step fault (request {sr.request.group_id})")

    def check_detok(self, prompt_token_ids) -> None:
        if self.detok_token is not None and self.detok_token in prompt_token_ids:
            self.detok_faults += 1
            raise InjectedFault("injected detokenization fault")

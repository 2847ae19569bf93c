"""Multi-host serving: process 0 takes the requests, every process runs them.

`jpaged serve` over several processes keeps the multi-controller model of
`jpaged.distributed.multihost` (every process runs the same engine and
launches the same jitted steps, whose collectives meet across hosts), but
only process 0 receives requests. So process 0 wraps its engine in a
`LeaderEngine`, which records every command that changes the engine (adds,
aborts) and, before each step, publishes the step's *journal* through the
`jax.distributed` key-value store: the commands since the last step, the
clock value the step uses, and the scheduler's learned prefill estimate
(measured on process 0, so that every process makes the same admission and
deadline decisions). The other processes run `follow`: read journal ``n``,
apply it to their own engine, step, repeat. Since the engine is
deterministic given its commands and its clock, every process schedules the
same steps. A failed add is recorded too (it may have drawn a seed), and
fails the same way everywhere.

`LeaderEngine.close` publishes a stop journal; the followers then return 0.
If process 0 dies, the coordination service (which lives in process 0) goes
with it and the followers exit with an error instead of waiting forever.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time

logger = logging.getLogger(__name__)

_KEY = "jpaged/journal/{}"
_KEEP = 64  # journals kept in the store: collectives hold processes within a step or two
_POLL_MS = 30_000  # a follower's wait for the next journal, repeated while idle


def _client():
    from jax._src.distributed import global_state

    if global_state.client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return global_state.client


class FrozenClock:
    """The scheduler's clock in a multi-host run: one value per step, set by
    process 0 and sent to the others in the journal."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _estimator_state(engine) -> dict:
    return dict(vars(engine.scheduler.estimator))


class LeaderEngine:
    """Process 0's engine: the `LLMEngine` request API, with every change
    journaled for the other processes (give it to `AsyncLLM`)."""

    def __init__(self, engine, clock: FrozenClock, client=None):
        self.engine, self.clock = engine, clock
        self._client = client or _client()
        self._pending: list[tuple] = []
        self._n = 0
        self._lock = threading.Lock()  # close() may come from another thread
        self._closed = False

    def __getattr__(self, name):  # read-only access (tokenizer, scheduler, stats, ...)
        if name == "fail_step":
            # Recovering on process 0 alone would leave the others out of
            # step: a failed step ends the multi-host engine.
            raise AttributeError(name)
        return getattr(self.engine, name)

    def add_request(self, request_id, prompt, params=None, arrival_time=None, **kwargs):
        arrival_time = time.time() if arrival_time is None else arrival_time
        # Recorded whether or not it is accepted: the attempt may draw a seed.
        self._pending.append(("add", (request_id, prompt, params),
                              dict(kwargs, arrival_time=arrival_time)))
        return self.engine.add_request(request_id, prompt, params,
                                       arrival_time=arrival_time, **kwargs)

    def abort_request(self, request_ids) -> None:
        self._pending.append(("abort", (request_ids,), {}))
        self.engine.abort_request(request_ids)

    def step(self):
        self.clock.now = time.time()
        self._publish(("step", self._pending, self.clock.now, _estimator_state(self.engine)))
        self._pending = []
        return self.engine.step()

    def close(self) -> None:
        """Tell the followers to return (after the commands not yet stepped)."""
        self._publish(("stop", self._pending, self.clock.now, _estimator_state(self.engine)))
        self._pending = []

    def _publish(self, journal) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the multi-host engine is closed")
            self._closed = journal[0] == "stop"
            self._send(journal)

    def _send(self, journal) -> None:
        self._client.key_value_set_bytes(_KEY.format(self._n), pickle.dumps(journal))
        if self._n >= _KEEP:
            self._client.key_value_delete(_KEY.format(self._n - _KEEP))
        self._n += 1


def _apply(engine, commands) -> None:
    for kind, args, kwargs in commands:
        try:
            getattr(engine, f"{kind}_request")(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - process 0 saw the same failure
            logger.debug("journaled %s failed here as on process 0: %r", kind, e)


def follow(engine, clock: FrozenClock, client=None) -> int:
    """Run process 0's journal on this process's engine until it says stop."""
    client = client or _client()
    n = 0
    logger.info("following process 0's engine")
    while True:
        try:
            data = client.blocking_key_value_get_bytes(_KEY.format(n), _POLL_MS)
        except Exception as e:  # noqa: BLE001 - a timeout only means process 0 is idle
            if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
                continue
            raise RuntimeError(f"lost process 0 while waiting for step {n}: {e}") from e
        kind, commands, now, estimator = pickle.loads(data)
        clock.now = now
        _apply(engine, commands)
        vars(engine.scheduler.estimator).update(estimator)
        if kind == "stop":
            logger.info("process 0 stopped after %d steps", n)
            return 0
        engine.step()
        n += 1

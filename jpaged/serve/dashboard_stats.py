"""Recent throughput, latency and step times for the live dashboard.

`DashboardStats` is an `AsyncLLM` stat logger, so it runs in the engine
thread: ``on_step`` keeps, per half-second bucket, the engine's cumulative
counters as they were before the bucket's first step (one tuple per bucket,
nothing per step beyond a comparison); ``on_output`` keeps the last
``samples`` times to first token and inter-token gaps. `summary` (also in the
engine thread, queued by the state endpoint) turns them into rates and
percentiles, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

_COUNTERS = ("generation_tokens", "prompt_tokens", "num_steps", "step_time_s", "device_wait_s")


def _percentiles(samples) -> dict:
    if not samples:
        return {"n": 0, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.fromiter(samples, float, len(samples)) * 1000,
                                  (50, 90, 99))
    return {"n": len(samples), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


class DashboardStats:
    """Args: ``bucket_s`` (sparkline resolution), ``history`` (buckets kept),
    ``window_s`` (the span of the "recent" rates), ``samples`` (latencies kept);
    ``clock`` is injectable for tests."""

    def __init__(self, bucket_s: float = 0.5, history: int = 120, window_s: float = 5.0,
                 samples: int = 1000, clock=time.monotonic):
        self.bucket_s, self.history, self.window_s = bucket_s, history, window_s
        self.clock = clock
        self._buckets: deque = deque(maxlen=history)  # (index, counters before it)
        self._last = (0,) * len(_COUNTERS)  # counters after the latest step
        self.ttft: deque = deque(maxlen=samples)
        self.itl: deque = deque(maxlen=samples)
        self._progress: dict[str, float] = {}  # request id -> its last token time

    # ----------------------------------------------------- loop thread
    def on_step(self, stats) -> None:
        b = int(self.clock() / self.bucket_s)
        if not self._buckets or self._buckets[-1][0] != b:
            self._buckets.append((b, self._last))
        self._last = tuple(getattr(stats, name, 0) for name in _COUNTERS)

    def on_output(self, out) -> None:
        m = out.metrics
        if m is None:
            return
        n_new = sum(len(o.token_ids) for o in out.outputs)
        prev = self._progress.get(out.request_id)
        if n_new and m.last_token_time is not None:
            if prev is None and m.first_token_time is not None:
                self.ttft.append(max(0.0, m.first_token_time - m.arrival_time))
            elif prev is not None:
                gap = max(0.0, m.last_token_time - prev) / n_new
                self.itl.extend([gap] * n_new)
            self._progress[out.request_id] = m.last_token_time
        if out.finished:
            self._progress.pop(out.request_id, None)

    def on_abort(self, request_id: str) -> None:
        self._progress.pop(request_id, None)

    # ------------------------------------------------------- snapshot
    def summary(self) -> dict:
        now = self.clock()
        cur = int(now / self.bucket_s)
        first = cur - self.history + 1
        start = cur - max(1, round(self.window_s / self.bucket_s))
        # at[b]: the counters when bucket b began (those of the next bucket
        # that saw a step, if b saw none; the latest ones past the last).
        known = dict(self._buckets)
        at, nxt = {}, self._last
        for b in range(cur + 1, min(first, start) - 1, -1):
            nxt = known.get(b, nxt)
            at[b] = nxt
        # Output tokens/s per bucket, oldest first; idle buckets are zeros.
        series = [(at[b + 1][0] - at[b][0]) / self.bucket_s for b in range(first, cur + 1)]
        span = max(now - start * self.bucket_s, 1e-9)
        d = [a - b for a, b in zip(self._last, at[start])]
        steps = d[2]
        return {
            "output_tokens_per_s": d[0] / span,
            "prompt_tokens_per_s": d[1] / span,
            "throughput_series": series,
            "series_bucket_s": self.bucket_s,
            "ttft_ms": _percentiles(self.ttft),
            "itl_ms": _percentiles(self.itl),
            "step": {"steps_per_s": steps / span,
                     "host_ms": (d[3] - d[4]) / steps * 1000 if steps else None,
                     "device_wait_ms": d[4] / steps * 1000 if steps else None},
        }

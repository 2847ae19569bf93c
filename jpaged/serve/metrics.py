"""Prometheus metrics named as vLLM names them, with a ``jpaged:`` prefix.

`ServerMetrics` is an `AsyncLLM` stat logger: ``on_step`` (loop thread, after
every step) sets the gauges from `EngineStats` and increments the counters
by their deltas; ``on_output`` (loop thread, every `RequestOutput`, a delta)
observes inter-token latency as tokens arrive and, when a request finishes,
its time to first token, end-to-end latency, queue time and finish reason;
``on_abort`` (loop thread, when the engine aborts an unfinished request)
counts the abort and drops the request's entry, so nothing is kept for
requests that are gone. ``on_add``, the ends above and ``on_fail`` (the
engine died under a request) count every accepted request's single end by
outcome (``jpaged:requests_ended``), for the soak test's accounting. Each app has its own `CollectorRegistry`, so several
servers can live in one process.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)


OUTCOMES = ("completed", "expired", "refused", "cancelled", "failed")


class ServerMetrics:
    """The server's metrics registry and the engine-side updates."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        lbl = ["model_name"]

        def g(name, doc):
            return Gauge(f"jpaged:{name}", doc, lbl, registry=r).labels(model_name)

        def c(name, doc):
            return Counter(f"jpaged:{name}", doc, lbl, registry=r).labels(model_name)

        def h(name, doc, buckets):
            return Histogram(f"jpaged:{name}", doc, lbl, buckets=buckets,
                             registry=r).labels(model_name)

        self.running = g("num_requests_running", "Requests running on the engine.")
        self.waiting = g("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = g("kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.")
        self.num_compiles = g("num_compiles", "Jitted step compilations so far.")
        self.compiles_pending = g(
            "warmup_compiles_pending", "Step buckets the background warm-up has yet to compile "
            "(until 0 a step may pad to a larger bucket).")
        self.counters = {
            "prefix_cache_queries": c("prefix_cache_queries",
                                      "Prefix cache queries, in tokens."),
            "prefix_cache_hits": c("prefix_cache_hits", "Prefix cache hits, in tokens."),
            "num_preemptions": c("num_preemptions", "Cumulative number of preemptions."),
            "prompt_tokens": c("prompt_tokens", "Prefill tokens processed."),
            "generation_tokens": c("generation_tokens", "Generation tokens processed."),
        }
        self._last = {k: 0 for k in self.counters}
        self.ttft = h("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = h("inter_token_latency_seconds", "Inter-token latency.", _ITL_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "End-to-end request latency.",
                     _LATENCY_BUCKETS)
        self.queue_time = h("request_queue_time_seconds", "Time spent waiting in the queue.",
                            _LATENCY_BUCKETS)
        self.success = Counter("jpaged:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        self.model_name = model_name
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)
        self._progress: dict[str, float] = {}  # running request id -> last token time
        # Exactly-once accounting (scripts/soak.py checks it): every accepted
        # request ends once, as one of OUTCOMES.
        self.accepted = c("requests_accepted", "Requests the engine accepted.")
        self.ended = Counter("jpaged:requests_ended", "Accepted requests that ended, by outcome.",
                             ["model_name", "outcome"], registry=r)
        for outcome in OUTCOMES:
            self.ended.labels(model_name, outcome)
        self.open = g("requests_open", "Accepted requests that have not ended yet.")
        self.end_anomalies = c("request_end_anomalies",
                               "Ends of requests that were not open (ended twice or unknown).")
        self._open: set[str] = set()

    def watch(self, engine) -> None:
        """Read the engine's background warm-up at every scrape (it moves
        while no step runs)."""
        runner = getattr(engine, "runner", None)
        if runner is not None:
            self.compiles_pending.set_function(lambda: runner.compiles_pending)

    # ----------------------------------------------------- loop thread
    def on_step(self, stats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.num_compiles.set(stats.num_compiles)
        for name, counter in self.counters.items():
            value = getattr(stats, name)
            if value > self._last[name]:
                counter.inc(value - self._last[name])
            self._last[name] = value

    def on_output(self, out) -> None:
        """``out`` is a delta: its token ids are the ones new since the last."""
        m = out.metrics
        if m is None:
            if out.finished:
                self.on_finished(out)
            return
        n_new = sum(len(o.token_ids) for o in out.outputs)
        last_t = m.last_token_time
        prev_t = self._progress.get(out.request_id)
        if prev_t is not None and last_t is not None and n_new:
            gap = max(0.0, last_t - prev_t) / n_new
            for _ in range(n_new):
                self.itl.observe(gap)
        if out.finished:
            self._progress.pop(out.request_id, None)
            self.on_finished(out)
        elif last_t is not None and n_new:
            self._progress[out.request_id] = last_t

    def on_add(self, request_id: str) -> None:
        self.accepted.inc()
        self._open.add(request_id)
        self.open.set(len(self._open))

    def _end(self, request_id: str, outcome: str) -> None:
        if request_id in self._open:
            self._open.discard(request_id)
            self.open.set(len(self._open))
        else:
            self.end_anomalies.inc()
        self.ended.labels(self.model_name, outcome).inc()

    def on_fail(self, request_id: str) -> None:
        """An unfinished request failed with the engine (it died or shut down)."""
        self._progress.pop(request_id, None)
        self._end(request_id, "failed")

    def on_finished(self, out) -> None:
        from jpaged.engine.recovery import RequestFailed
        from jpaged.sched.policy import RequestRefused

        err = out.error
        self._end(out.request_id, "refused" if isinstance(err, RequestRefused) else
                  "failed" if isinstance(err, RequestFailed) else
                  "expired" if any(o.stop_reason == "deadline" for o in out.outputs) else
                  "completed")
        m = out.metrics
        if m is None:
            return
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
        end = m.finished_time or time.time()
        self.e2e.observe(max(0.0, end - m.arrival_time))
        sched = m.first_scheduled_time
        if sched is not None:
            self.queue_time.observe(max(0.0, sched - m.arrival_time))
        reason = out.outputs[0].finish_reason if out.outputs else None
        self.success.labels(self.model_name, reason or "abort").inc()

    def on_abort(self, request_id: str) -> None:
        """A request aborted before finishing (client disconnect, shutdown)."""
        self._progress.pop(request_id, None)
        self.success.labels(self.model_name, "abort").inc()
        self._end(request_id, "cancelled")

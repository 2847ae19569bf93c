"""`DashboardStats` with an injected clock: rates per bucket and over the
recent window, idle buckets as zeros, step time split, and latency
percentiles from delta outputs."""

from types import SimpleNamespace as NS

import pytest

from jpaged.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jpaged.serve.dashboard_stats import DashboardStats


def stats(gen, steps, step_s, wait_s):
    return NS(generation_tokens=gen, prompt_tokens=2 * gen, num_steps=steps,
              step_time_s=step_s, device_wait_s=wait_s)


def test_rates_series_and_step_split():
    now = [1000.0]
    d = DashboardStats(bucket_s=0.5, history=20, window_s=2.0, clock=lambda: now[0])
    gen = steps = 0
    for k in range(1, 41):  # 4 s at 10 steps/s, 20 tokens a step, 8 ms steps of which 3 waiting
        now[0] = 1000 + k / 10  # bucket edges (multiples of 0.5) stay exact
        gen, steps = gen + 20, steps + 1
        d.on_step(stats(gen, steps, 0.008 * steps, 0.003 * steps))
    s = d.summary()
    assert s["output_tokens_per_s"] == pytest.approx(200, rel=0.05)
    assert s["prompt_tokens_per_s"] == pytest.approx(400, rel=0.05)
    assert s["step"]["steps_per_s"] == pytest.approx(10, rel=0.05)
    assert s["step"]["host_ms"] == pytest.approx(5.0)
    assert s["step"]["device_wait_ms"] == pytest.approx(3.0)
    series = s["throughput_series"]
    # Bucket [1000.0, 1000.5) saw 4 steps, the next seven 5 each, the current one 1.
    assert len(series) == 20 and series[-10:] == [0, 160] + [200] * 7 + [40]
    now[0] += 5.0  # idle: no steps
    s = d.summary()
    assert s["output_tokens_per_s"] == 0 and s["step"]["host_ms"] is None
    assert s["throughput_series"][-10:] == [0] * 10
    assert sum(s["throughput_series"]) * 0.5 == 800


def out(rid, n_new, first, last, finished=False):
    m = RequestMetrics(arrival_time=10.0, first_token_time=first, last_token_time=last)
    return RequestOutput(rid, None, [1], [CompletionOutput(0, "", list(range(n_new)), None,
                                                           None, None)], finished, metrics=m)


def test_latency_percentiles_from_deltas():
    d = DashboardStats(clock=lambda: 0.0)
    d.on_output(out("a", 1, 10.2, 10.2))  # TTFT 200 ms
    d.on_output(out("a", 2, 10.2, 10.3))  # two tokens in 100 ms: 50 ms each
    d.on_output(out("a", 1, 10.2, 10.32, finished=True))  # 20 ms
    d.on_output(out("b", 0, None, None))  # nothing yet
    d.on_output(out("b", 1, 10.4, 10.4))  # TTFT 400 ms
    d.on_abort("b")
    s = d.summary()
    assert s["ttft_ms"]["n"] == 2 and s["ttft_ms"]["p50"] == pytest.approx(300)
    assert s["itl_ms"]["n"] == 3 and s["itl_ms"]["p50"] == pytest.approx(50)
    assert d._progress == {}  # nothing kept for finished or aborted requests

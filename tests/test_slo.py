"""Deadlines and SLO-aware scheduling on deterministic traces: the scheduler
with a fake runner (every sample row gets token 7) and an injected clock,
then the real engine and AsyncLLM with an injected clock."""

import asyncio
import math

import pytest

from jpaged.cache import KVCacheManager
from jpaged.sampling_params import SamplingParams
from jpaged.sched import PrefillEstimator, Request, RequestRefused, RequestStatus, Scheduler, \
    SchedulerConfig
from jpaged.sched.policy import SLOPolicy


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def make(clock, n_blocks=16, block_size=4, **cfg):
    kv = KVCacheManager(n_blocks, block_size, True)
    base = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    return Scheduler(SchedulerConfig(**{**base, **cfg}), kv, clock=clock), kv


def req(rid, n_prompt, clock, max_tokens=8, priority=0, deadline=None, ttft=None, first=1):
    now = clock()
    return Request(request_id=rid, group_id=rid,
                   prompt_token_ids=list(range(first, first + n_prompt)),
                   sampling_params=SamplingParams(max_tokens=max_tokens),
                   arrival_time=now, seed=0, priority=priority, max_tokens=max_tokens,
                   forked=True, deadline=None if deadline is None else now + deadline,
                   ttft_deadline=None if ttft is None else now + ttft)


def run_step(s):
    out = s.schedule()
    s.update_from_output(out, [[7] * sr.num_samples for sr in out.scheduled])
    return out, [sr.request.request_id for sr in out.scheduled]


def test_waiting_past_deadline_is_refused_and_leaves_nothing():
    clock = Clock()
    s, kv = make(clock, max_num_seqs=1)
    s.add_request(req("a", 4, clock, max_tokens=20))
    s.add_request(req("b", 4, clock, deadline=0.5, first=30))
    out, ids = run_step(s)
    assert ids == ["a"] and not out.refused  # b waits for a's seat
    clock.t += 0.4
    out, _ = run_step(s)
    assert not out.refused
    clock.t += 0.1  # b's deadline
    out, ids = run_step(s)
    assert ids == ["a"]
    [(r, err)] = out.refused
    assert r.request_id == "b" and isinstance(err, RequestRefused)
    assert "deadline" in err.reason and err.retry_after_s >= 1.0
    assert r.status == RequestStatus.FINISHED_ABORTED and "b" not in s.requests
    assert not s.waiting and kv.get_block_ids("b") == []


def test_max_queue_wait_and_ttft_refuse_waiting():
    clock = Clock()
    s, kv = make(clock, max_num_seqs=1, max_queue_wait_ms=300)
    s.add_request(req("a", 4, clock, max_tokens=30))
    s.add_request(req("b", 4, clock, first=30))
    s.add_request(req("c", 4, clock, ttft=0.2, first=40))
    run_step(s)
    clock.t += 0.2
    out, _ = run_step(s)
    assert [r.request_id for r, _ in out.refused] == ["c"]
    assert "time-to-first-token" in out.refused[0][1].reason
    clock.t += 0.1
    out, _ = run_step(s)
    assert [r.request_id for r, _ in out.refused] == ["b"]
    assert "max_queue_wait_ms=300" in out.refused[0][1].reason
    assert [r.request_id for r in s.running] == ["a"]  # a started: never refused


def test_running_past_deadline_ends_with_partial_output_and_frees_blocks():
    clock = Clock()
    s, kv = make(clock)
    s.add_request(req("a", 6, clock, max_tokens=20, deadline=1.0))
    s.add_request(req("b", 5, clock, max_tokens=20, first=30))
    for _ in range(3):
        run_step(s)
        clock.t += 0.3
    a = s.requests["a"]
    assert a.num_output_tokens == 3
    clock.t = a.deadline  # 1.0 s after arrival
    out, ids = run_step(s)
    assert out.expired == [a] and ids == ["b"]
    assert a.status == RequestStatus.FINISHED_LENGTH and a.finish_reason == "length"
    assert a.stop_reason == "deadline" and a.output_token_ids == [7, 7, 7]
    assert "a" in out.freed_req_ids and kv.get_block_ids("a") == []
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == kv.num_blocks - 1


def test_slo_orders_by_priority_then_slack():
    clock = Clock()
    s, _ = make(clock, max_num_seqs=1, scheduling_policy="slo")
    s.add_request(req("loose", 4, clock, max_tokens=1, deadline=9.0))
    s.add_request(req("none", 4, clock, max_tokens=1, first=20))
    s.add_request(req("tight", 4, clock, max_tokens=1, deadline=2.0, first=30))
    s.add_request(req("urgent-low", 4, clock, max_tokens=1, deadline=1.0, priority=5, first=40))
    s.add_request(req("vip", 4, clock, max_tokens=1, priority=-1, first=50))
    order = []
    for _ in range(5):
        out, ids = run_step(s)
        order += ids
        s.finish_requests(ids, RequestStatus.FINISHED_LENGTH)
    # Priority first; within priority 0 least slack; no deadline = infinite slack.
    assert order == ["vip", "tight", "loose", "none", "urgent-low"]


def test_slack_counts_the_learned_prefill_time():
    est = PrefillEstimator()
    est.record(100, 1.4)  # one step size: all of it is per-token cost, 14 ms
    assert (est.overhead, est.seconds_per_token) == (0.0, pytest.approx(0.014))
    pol = SLOPolicy(est)
    clock = Clock()
    long = req("long", 50, clock, deadline=1.0)
    short = req("short", 5, clock, deadline=0.8, first=60)
    # long: 1.0 - 0.7 = 0.3 s of slack; short: 0.8 - 0.07 = 0.73 s.
    assert pol.slack(long, clock()) == pytest.approx(0.3)
    assert pol.next_waiting([short, long], clock()) is long
    assert pol.slack(req("free", 5, clock), clock()) == math.inf


def test_estimator_separates_step_overhead_from_token_cost():
    est = PrefillEstimator(chunk=64)
    for n in (4, 4, 8, 64, 8, 40, 4):  # decode steps and prefill chunks: 20 ms + 1 ms a token
        est.record(n, 0.020 + 0.001 * n)
    assert est.overhead == pytest.approx(0.020)
    assert est.seconds_per_token == pytest.approx(0.001)
    # A 10-token prompt: one step; 130 tokens: three chunks, three overheads.
    assert est.seconds(10) == pytest.approx(0.030)
    assert est.seconds(130) == pytest.approx(3 * 0.020 + 0.130)
    # Recent steps win: each size class keeps its last 16 steps.
    for _ in range(16):
        for n in (4, 8, 40, 64):
            est.record(n, 0.001 * n)
    assert est.overhead == pytest.approx(0.0, abs=1e-9)
    assert est.seconds_per_token == pytest.approx(0.001)
    # A long run of decode steps does not push the prefill chunks out (with
    # only same-sized steps left, nothing would tell overhead from tokens).
    for n in (4, 8, 40, 64) * 16:
        est.record(n, 0.020 + 0.001 * n)
    for _ in range(500):
        est.record(4, 0.024)
    assert est.overhead == pytest.approx(0.020)
    assert est.seconds_per_token == pytest.approx(0.001)


def test_slo_admission_refuses_what_cannot_make_it():
    clock = Clock()
    s, _ = make(clock, scheduling_policy="slo")
    s.estimator.record(10, 0.1)  # 10 ms a prefill token
    with pytest.raises(RequestRefused, match="cannot meet its deadline"):
        s.add_request(req("hopeless", 40, clock, deadline=0.3))  # needs 0.4 s
    s.add_request(req("fine", 40, clock, max_tokens=2, deadline=0.5))
    assert "hopeless" not in s.requests
    run_step(s)  # 'fine' starts
    # fcfs takes the same request and lets it run late.
    f, _ = make(clock)
    f.estimator.record(10, 0.1)
    f.add_request(req("hopeless", 40, clock, deadline=0.3))
    # Admitted, then waiting so long that it cannot make it: refused at schedule.
    s.add_request(req("later", 10, clock, ttft=0.3, first=50))
    clock.t += 0.25  # 0.05 s left, 0.1 s of prefill
    out = s.schedule()
    assert [r.request_id for r, _ in out.refused] == ["later"]  # 'fine' runs on
    assert [sr.request.request_id for sr in out.scheduled] == ["fine"]


def test_slo_victim_is_lowest_priority_then_most_slack():
    clock = Clock()
    s, kv = make(clock, n_blocks=7, scheduling_policy="slo")  # 6 usable blocks of 4
    s.add_request(req("tight", 8, clock, max_tokens=8, deadline=5.0))
    s.add_request(req("loose", 8, clock, max_tokens=8, deadline=50.0, first=20))
    s.add_request(req("low", 4, clock, max_tokens=8, deadline=1.0, priority=1, first=40))
    run_step(s)
    run_step(s)  # everybody grows; 'low' (priority 1) goes first
    assert s.requests["low"].num_preemptions == 1
    while s.requests["tight"].num_preemptions == 0 and \
            s.requests["loose"].num_preemptions == 0:
        run_step(s)
    assert s.requests["loose"].num_preemptions == 1  # more slack than 'tight'
    assert s.requests["tight"].num_preemptions == 0


# ------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def engine_factory(llama_dir):
    from jpaged.engine.llm_engine import LLMEngine

    def make_engine(clock, **kw):
        base = dict(model=llama_dir, max_num_seqs=2, max_num_batched_tokens=64,
                    max_model_len=128, compile_all_buckets=False)
        return LLMEngine(clock=clock, **{**base, **kw})
    return make_engine


def test_engine_deadline_expiry_and_refusal(engine_factory):
    clock = Clock()
    eng = engine_factory(clock, max_num_seqs=1)
    eng.add_request("run", list(range(5, 15)),
                    SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                    deadline_ms=1000)
    eng.add_request("queued", list(range(20, 30)),
                    SamplingParams(temperature=0, max_tokens=5, deadline_ms=500))
    outs = []
    for _ in range(6):
        outs += eng.step()
    clock.t += 0.5
    refused = [o for o in eng.step() if o.request_id == "queued"]
    assert len(refused) == 1 and isinstance(refused[0].error, RequestRefused)
    assert refused[0].finished and refused[0].outputs[0].finish_reason == "abort"
    clock.t += 0.5
    done = [o for o in eng.step() if o.request_id == "run"]
    assert len(done) == 1 and done[0].finished
    c = done[0].outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("length", "deadline")
    assert 3 <= len(c.token_ids) < 50  # partial
    assert not eng.has_unfinished_requests()
    assert eng.kv.num_free_blocks == eng.kv.num_blocks - 1
    eng.step()
    assert not eng.runner.batch.rows
    with pytest.raises(ValueError, match="deadline_ms"):
        SamplingParams(deadline_ms=0)


def test_async_llm_raises_refusal(engine_factory):
    from jpaged.engine.async_llm import AsyncLLM

    clock = Clock()
    eng = engine_factory(clock, scheduling_policy="slo")
    eng.scheduler.estimator.record(10, 1.0)  # 0.1 s a prefill token
    llm = AsyncLLM(eng)

    async def main():
        with pytest.raises(RequestRefused) as e:  # 10 tokens need 1 s
            await llm.add_request("x", list(range(5, 15)), SamplingParams(deadline_ms=200))
        assert e.value.retry_after_s >= 1.0
        out = None
        async for out in llm.generate(list(range(5, 15)), SamplingParams(max_tokens=3)):
            pass
        assert out.finished
    try:
        asyncio.run(main())
    finally:
        llm.shutdown()

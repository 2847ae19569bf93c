"""The scheduler alone, with a fake runner whose outputs are worked out by hand:
every sample row gets token 7. No model, no JAX."""

import pytest

from jpaged.cache import KVCacheManager
from jpaged.engine.output_processor import check_token_stop
from jpaged.sampling_params import SamplingParams
from jpaged.sched import Request, RequestStatus, Scheduler, SchedulerConfig


def make(n_blocks=16, block_size=4, caching=True, host=0, **cfg):
    kv = KVCacheManager(n_blocks, block_size, caching, num_host_blocks=host)
    base = dict(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64)
    return Scheduler(SchedulerConfig(**{**base, **cfg}), kv), kv


def req(rid, n_prompt, max_tokens=4, arrival=0.0, priority=0, n=1, first=1):
    return Request(request_id=rid, group_id=rid,
                   prompt_token_ids=list(range(first, first + n_prompt)),
                   sampling_params=SamplingParams(max_tokens=max_tokens, n=n),
                   arrival_time=arrival, seed=0, priority=priority, max_tokens=max_tokens,
                   forked=n == 1)


def run_step(s):
    """One step with the fake runner; returns {request_id: num_new_tokens}."""
    out = s.schedule()
    s.update_from_output(out, [[7] * sr.num_samples for sr in out.scheduled])
    for r in list(s.running):
        if r.num_output_tokens and r.num_computed_tokens == r.num_tokens - 1 \
                and check_token_stop(r, s.config.max_model_len):
            s.finish_requests([r.request_id], r.status)
    return out, {sr.request.request_id: sr.num_new_tokens for sr in out.scheduled}


def test_token_budget_and_chunked_prefill():
    s, kv = make()
    s.add_request(req("a", 10))
    s.add_request(req("b", 3, arrival=1))
    out, got = run_step(s)
    assert got == {"a": 8}  # the budget caps a's first chunk; b waits for budget
    out, got = run_step(s)
    assert got == {"a": 2, "b": 3}  # a's last chunk, then b's whole prompt
    assert [sr.num_samples for sr in out.scheduled] == [1, 1]
    out, got = run_step(s)
    assert got == {"a": 1, "b": 1}  # both decode


def test_max_num_seqs_limits_admission():
    s, kv = make(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(4):
        s.add_request(req(str(i), 2, arrival=i))
    _, got = run_step(s)
    assert set(got) == {"0", "1"}
    assert [r.request_id for r in s.waiting] == ["2", "3"]


def test_preemption_recompute_takes_latest_and_frees_blocks():
    s, kv = make(n_blocks=5, max_num_batched_tokens=64)  # 4 usable blocks of 4
    s.add_request(req("old", 8, max_tokens=8, arrival=0))
    s.add_request(req("new", 8, max_tokens=8, arrival=1, first=50))
    _, got = run_step(s)
    assert got == {"old": 8, "new": 8}  # 2 full blocks each
    _, got = run_step(s)  # both need a third block for token 9: only one fits
    assert got == {"old": 1}
    new = s.requests["new"]
    assert new.status == RequestStatus.WAITING and new.num_computed_tokens == 0
    assert new.num_preemptions == 1 and s.num_preemptions == 1
    assert kv.get_block_ids("new") == []
    assert s.waiting[0] is new


def test_priority_victim_and_admission_order():
    s, kv = make(n_blocks=5, max_num_batched_tokens=64, scheduling_policy="priority")
    s.add_request(req("low", 8, max_tokens=8, arrival=0, priority=9))
    s.add_request(req("high", 8, max_tokens=8, arrival=1, priority=0, first=50))
    run_step(s)
    _, got = run_step(s)
    assert got == {"high": 1}  # the low-priority one is the victim despite arriving first
    assert s.requests["low"].status == RequestStatus.WAITING


def test_swap_preemption_round_trip():
    s, kv = make(n_blocks=5, host=8, max_num_batched_tokens=64, preemption_mode="swap")
    s.add_request(req("a", 8, max_tokens=8, arrival=0))
    s.add_request(req("b", 8, max_tokens=8, arrival=1, first=50))
    run_step(s)
    out, got = run_step(s)
    assert got == {"a": 1}
    b = s.requests["b"]
    assert b.status == RequestStatus.SWAPPED and b.num_computed_tokens == 8
    assert len(out.swap_out) == 2 and kv.num_used_host_blocks == 2
    while s.requests.get("a") is not None:
        run_step(s)  # a finishes and frees its blocks
    out, got = run_step(s)
    assert len(out.swap_in) == 2 and got == {"b": 1}  # back without recomputing
    assert kv.num_used_host_blocks == 0


def test_never_fits_and_max_model_len_fail_fast():
    s, kv = make(n_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add_request(req("big", 20, max_tokens=4))
    with pytest.raises(ValueError, match="max_model_len=64"):
        s.add_request(req("long", 60, max_tokens=10))
    assert not s.has_unfinished_requests()


def test_n_samples_fork_and_finish_free_everything():
    s, kv = make(max_num_batched_tokens=64)
    s.add_request(req("g", 6, max_tokens=3, n=3))
    out, _ = run_step(s)
    assert [sr.num_samples for sr in out.scheduled] == [3]
    assert {r.request_id for r in s.running} == {"g", "g#1", "g#2"}
    assert kv.get_block_ids("g") == kv.get_block_ids("g#1") == kv.get_block_ids("g#2")
    out, _ = run_step(s)  # all three write into the shared partial block: copy-on-write
    assert len(out.copies) == 2
    while s.has_unfinished_requests():
        run_step(s)
    assert kv.num_free_blocks == kv.num_blocks - 1


def test_preempted_request_goes_back_to_the_front_of_several_waiting():
    s, kv = make(n_blocks=5, max_num_seqs=2, max_num_batched_tokens=64)
    s.add_request(req("old", 8, max_tokens=8, arrival=0))
    s.add_request(req("new", 8, max_tokens=8, arrival=1, first=50))
    for i in range(3):
        s.add_request(req(f"w{i}", 2, arrival=2 + i, first=100 + 10 * i))
    _, got = run_step(s)
    assert got == {"old": 8, "new": 8}
    _, got = run_step(s)
    assert got == {"old": 1}  # "new" preempted for old's third block
    assert [r.request_id for r in s.waiting] == ["new", "w0", "w1", "w2"]


def test_equal_priorities_preempt_the_latest_arrival():
    s, kv = make(n_blocks=5, max_num_batched_tokens=64, scheduling_policy="priority")
    # Added out of arrival order, so that neither list position nor request id
    # can stand in for the arrival time (under FCFS the add order is the
    # arrival order, and test_preemption_recompute_takes_latest covers it).
    s.add_request(req("b", 8, max_tokens=8, arrival=1.0, priority=3, first=50))
    s.add_request(req("a", 8, max_tokens=8, arrival=0.0, priority=3))
    run_step(s)
    _, got = run_step(s)
    assert got == {"a": 1}
    assert s.requests["b"].status == RequestStatus.WAITING
    assert s.requests["b"].num_preemptions == 1 and s.requests["a"].num_preemptions == 0

"""The paged engine against Hugging Face greedy decoding, under every way of
batching: more prompts than max_num_seqs, chunked prefill, block sizes 8 and
16, preemption by recompute and by swap, prefix caching on and off."""

import numpy as np
import pytest

from jpaged import LLM, SamplingParams

MAX_TOKENS = 24
# Lengths chosen to span several blocks of 8 and 16, and to not be multiples.
PROMPT_LENS = (1, 3, 8, 13, 16, 21, 33, 47, 60, 5)


def make_prompts(seed=0, lens=PROMPT_LENS, vocab=900):
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(3, vocab, n)] for n in lens]


_HF_CACHE = {}


def hf_greedy(model_dir, prompts, max_tokens=MAX_TOKENS):
    """transformers generate(do_sample=False), batch 1 per prompt (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM

    key = (model_dir, tuple(map(tuple, prompts)), max_tokens)
    if key not in _HF_CACHE:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        outs = []
        with torch.no_grad():
            for p in prompts:
                ids = model.generate(torch.tensor([p]), do_sample=False,
                                     max_new_tokens=max_tokens,
                                     attention_mask=torch.ones(1, len(p), dtype=torch.long))
                outs.append(ids[0, len(p):].tolist())
        _HF_CACHE[key] = outs
    return _HF_CACHE[key]


def assert_all_blocks_free(llm):
    e = llm.llm_engine
    assert not e.has_unfinished_requests()
    assert not e.scheduler.running and not e.scheduler.waiting
    assert e.kv.num_free_blocks == e.kv.num_blocks - 1
    assert e.kv.num_used_host_blocks == 0
    assert not e.kv.req_to_blocks
    # Rows of finished requests are released at the next schedule.
    e.step()
    assert not e.runner.batch.rows


def run_greedy(llm, prompts, max_tokens=MAX_TOKENS):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


SMALL = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)


ASYNC = pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])


@ASYNC
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_equals_hf_each_arch(request, arch, async_scheduling):
    model_dir = request.getfixturevalue(f"{arch}_dir")
    prompts = make_prompts()
    llm = LLM(model_dir, block_size=16, async_scheduling=async_scheduling,
              **SMALL)  # 10 prompts > max_num_seqs=4
    assert run_greedy(llm, prompts) == hf_greedy(model_dir, prompts)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("case", [
    dict(block_size=8, max_num_batched_tokens=16),  # chunked prefill, small blocks
    dict(block_size=8, enable_prefix_caching=False),
    dict(block_size=16, num_kv_blocks=12),  # preemption by recompute
    dict(block_size=8, num_kv_blocks=20, preemption_mode="swap", swap_space=0.01),
], ids=["chunked-bs8", "no-prefix-cache", "preempt-recompute", "preempt-swap"])
@ASYNC
def test_greedy_equals_hf_under_pressure(request, arch, case, async_scheduling):
    model_dir = request.getfixturevalue(f"{arch}_dir")
    prompts = make_prompts(seed=1)
    cfg = {**SMALL, **case, "async_scheduling": async_scheduling}
    llm = LLM(model_dir, **cfg)
    assert run_greedy(llm, prompts) == hf_greedy(model_dir, prompts)
    stats = llm.llm_engine.get_stats()
    if "num_kv_blocks" in case:
        assert stats.num_preemptions > 0, "the KV budget was meant to force preemption"
    assert_all_blocks_free(llm)


def test_prefix_caching_hits_and_same_output(llama_dir):
    rng = np.random.default_rng(5)
    shared = [int(x) for x in rng.integers(3, 900, 40)]
    prompts = [shared + [int(x) for x in rng.integers(3, 900, k)] for k in (3, 7)]
    cached = LLM(llama_dir, block_size=8, **SMALL)
    first = cached.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=8),
                            use_tqdm=False)[0]
    second = cached.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=8),
                             use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40  # five full blocks of the shared prefix
    stats = cached.llm_engine.get_stats()
    assert stats.prefix_cache_hits >= 40
    uncached = LLM(llama_dir, block_size=8, enable_prefix_caching=False, **SMALL)
    ref = run_greedy(uncached, prompts, max_tokens=8)
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == ref
    assert_all_blocks_free(cached)


def test_pallas_backend_interpreted_equals_reference_and_hf(llama_dir):
    """attention_backend='pallas' on CPU runs the kernels with interpret=True:
    the decode kernel for decode-only steps, the ragged one for the rest."""
    prompts = make_prompts(seed=2, lens=(1, 9, 20, 5))
    cfg = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, block_size=8)
    pallas = LLM(llama_dir, attention_backend="pallas", **cfg)
    runner = pallas.llm_engine.runner
    assert runner.cfg.backend == "pallas"
    got = run_greedy(pallas, prompts, max_tokens=10)
    assert got == run_greedy(LLM(llama_dir, attention_backend="reference", **cfg), prompts,
                             max_tokens=10)
    assert got == hf_greedy(llama_dir, prompts, max_tokens=10)
    assert runner.num_compiles == 4  # 2 token buckets x (mixed, decode-only): no recompiles
    assert_all_blocks_free(pallas)


def test_priority_policy_orders_waiting_requests(llama_dir):
    """Under scheduling_policy='priority' a lower priority value runs first;
    under FCFS arrival order wins."""
    prompts = make_prompts(seed=3, lens=(5, 6, 7))
    params = SamplingParams(temperature=0, max_tokens=4)
    for policy, prio, expect in [("priority", [5, 0, 1], ["1", "2", "0"]),
                                 ("fcfs", [5, 0, 1], ["0", "1", "2"])]:
        llm = LLM(llama_dir, max_num_seqs=1, max_num_batched_tokens=16, max_model_len=64,
                  block_size=8, scheduling_policy=policy)
        e = llm.llm_engine
        for i, (p, pr) in enumerate(zip(prompts, prio)):
            e.add_request(str(i), p, params, priority=pr)
        order = []
        while e.has_unfinished_requests():
            order += [o.request_id for o in e.step() if o.finished]
        assert order == expect, policy
        assert_all_blocks_free(llm)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_chunked_prefill_logits_equal_one_shot(request, arch):
    """A prompt prefilled in 8-token chunks gives the same next-token
    distribution (top-20 logprobs) as the same prompt prefilled at once."""
    model_dir = request.getfixturevalue(f"{arch}_dir")
    prompt = make_prompts(seed=7, lens=(45,))[0]
    sp = SamplingParams(temperature=0, max_tokens=3, logprobs=20)
    got = {}
    for budget in (8, 64):
        llm = LLM(model_dir, block_size=8, max_num_seqs=4, max_num_batched_tokens=budget,
                  max_model_len=128, enable_prefix_caching=False)
        got[budget] = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    chunked, whole = got[8], got[64]
    assert chunked.token_ids == whole.token_ids
    for a, b in zip(chunked.logprobs, whole.logprobs):
        assert a.keys() == b.keys()
        for tid in a:
            assert abs(a[tid].logprob - b[tid].logprob) < 1e-5, tid


def test_lm_head_over_the_first_rows_only_when_they_are_all(llama_dir, monkeypatch):
    """A step whose sampling rows all lie in the first FEW_LOGIT_ROWS multiplies
    only those by the lm_head (prefill steps), else all rows (large decode
    steps): both give the tokens an engine that always multiplies every row
    gives, and a step of each kind runs."""
    from jpaged.runner import model_runner

    prompts = make_prompts(seed=5, lens=[1 + (3 * i) % 8 for i in range(44)])
    cfg = dict(max_num_seqs=48, max_num_batched_tokens=128, max_model_len=256, block_size=8,
               compile_all_buckets=False)
    llm = LLM(llama_dir, **cfg)
    sampled = []
    run = llm.llm_engine.runner._run

    def logged(buf, layout, decode_only):
        v = layout.views(np.asarray(buf))
        sampled.append((layout.num_seqs, int((v["sample_token_rows"] < 48).sum())))
        return run(buf, layout, decode_only)

    llm.llm_engine.runner._run = logged
    got = run_greedy(llm, prompts, max_tokens=12)
    few = model_runner.FEW_LOGIT_ROWS
    assert any(s > few and n <= few for s, n in sampled), sampled  # the first rows only
    assert any(s > few and n > few for s, n in sampled)  # every row
    monkeypatch.setattr(model_runner, "FEW_LOGIT_ROWS", 10 ** 6)
    assert got == run_greedy(LLM(llama_dir, **cfg), prompts, max_tokens=12)


def test_engine_freezes_the_heap_and_collects_a_dropped_engine(llama_dir, monkeypatch):
    """An engine freezes the heap (full collections then skip the model and
    the compiled steps); the next engine first collects what a dropped one
    left in reference cycles, so a gone engine does not stay in memory."""
    import gc
    import weakref

    monkeypatch.setenv("JPAGED_GC_FREEZE", "1")
    cfg = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
               compile_all_buckets=False)
    gc.unfreeze()
    try:
        first = LLM(llama_dir, **cfg)
        assert gc.get_freeze_count() > 0
        runner = weakref.ref(first.llm_engine.runner)
        cycle = [first]
        cycle.append(cycle)  # garbage only the cyclic collector can free...
        gc.freeze()  # ...once unfrozen: as if a later freeze had caught it
        del first, cycle
        gc.collect()
        assert runner() is not None
        second = LLM(llama_dir, **cfg)
        assert runner() is None
        assert run_greedy(second, make_prompts(lens=(3, 5)), max_tokens=4)
    finally:
        gc.unfreeze()

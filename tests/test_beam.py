"""Beam search inside the engine against transformers ``generate(num_beams=W)``:
the same hypotheses in the same order with scores within 1e-4, on llama,
mistral and qwen2 checkpoints whose EOS is likely enough to end beams, for
every length_penalty x early_stopping pair; under preemption (recompute and
swap) and prefix caching; beams share blocks; abort and async scheduling."""

import os

import numpy as np
import pytest

from jpaged import LLM, BeamSearchParams, LLMEngine, SamplingParams

MAX_TOKENS = 10
PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 300, 12, 99, 7, 8, 150, 33, 21, 200, 17, 3]]
COMBOS = [(lp, es) for lp in (0.5, 1.0, 2.0) for es in (True, False, "never")]
ARCH_KW = {"llama": {}, "qwen2": {},
           "mistral": dict(num_attention_heads=8, num_key_value_heads=2)}
_MODELS, _HF = {}, {}


def eos_model(tmp_path_factory, arch):
    """A tiny checkpoint whose lm_head row of EOS points along the mean final
    hidden state, scaled so that EOS often ranks near the top: beams end."""
    if arch in _MODELS:
        return _MODELS[arch]
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    from jpaged.tiny import make_tiny_model

    path = make_tiny_model(str(tmp_path_factory.mktemp(f"eos_{arch}")), arch=arch,
                           **ARCH_KW[arch])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    with torch.no_grad():
        h = torch.cat([model(torch.tensor([rng.integers(3, 900, 12).tolist()]),
                             output_hidden_states=True).hidden_states[-1][0]
                       for _ in range(8)]).numpy()
    f = os.path.join(path, "model.safetensors")
    w = load_file(f)
    head = w["lm_head.weight"]
    m = h.mean(0)
    top = (h @ head.T).max(-1).mean()
    eos = model.config.eos_token_id
    head[eos] = m / (m @ m) * top * 0.97
    save_file(w, f, metadata={"format": "pt"})
    _MODELS[arch] = path
    return path


def hf_beams(model_dir, prompt, width, lp, es, max_tokens=MAX_TOKENS, rep=1.0, nret=None):
    """transformers' beam search: [(generated tokens, score)] best first."""
    import torch
    from transformers import AutoModelForCausalLM

    key = (model_dir, tuple(prompt), width, lp, es, max_tokens, rep, nret)
    if key not in _HF:
        if model_dir not in _HF:
            _HF[model_dir] = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32).eval()
        model = _HF[model_dir]
        with torch.no_grad():
            r = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                num_beams=width, do_sample=False, num_return_sequences=nret or width,
                max_new_tokens=max_tokens, length_penalty=lp, early_stopping=es,
                repetition_penalty=rep, return_dict_in_generate=True, output_scores=True)
        lens = (r.beam_indices != -1).sum(1).tolist()
        _HF[key] = [(r.sequences[i, len(prompt):len(prompt) + n].tolist(),
                     float(r.sequences_scores[i])) for i, n in enumerate(lens)]
    return _HF[key]


def params(width, lp, es, **kw):
    return SamplingParams(num_beams=width, num_return_sequences=width, temperature=0.0,
                          max_tokens=MAX_TOKENS, length_penalty=lp, early_stopping=es, **kw)


def assert_same(outs, expected, lp):
    got = [(list(c.token_ids), c.cumulative_logprob / len(c.token_ids) ** lp)
           for c in outs.outputs]
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-4)


def assert_all_free(engine):
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv.num_free_blocks == engine.kv.num_blocks - 1
    assert engine.kv.num_used_host_blocks == 0 and not engine.kv.req_to_blocks


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    cache = {}

    def get(arch, **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(eos_model(tmp_path_factory, arch), block_size=8, max_num_seqs=16,
                             max_num_batched_tokens=64, max_model_len=128, **kw)
        return cache[key]
    return get


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_beam_search_equals_transformers(llms, arch, width):
    """Every length_penalty x early_stopping pair, both prompts, in one batch."""
    llm = llms(arch)
    reqs = [(p, lp, es) for lp, es in COMBOS for p in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in reqs],
                        [params(width, lp, es) for _, lp, es in reqs], use_tqdm=False)
    path = llm.llm_engine.config.model
    stops = 0
    for out, (p, lp, es) in zip(outs, reqs):
        assert_same(out, hf_beams(path, p, width, lp, es), lp)
        stops += sum(c.finish_reason == "stop" for c in out.outputs)
    assert stops > 0, "no beam ended on EOS: the test would not exercise EOS handling"
    assert_all_free(llm.llm_engine)


@pytest.mark.parametrize("case", [
    dict(num_kv_blocks=14, preemption_mode="recompute", enable_prefix_caching=False),
    dict(num_kv_blocks=14, preemption_mode="recompute", enable_prefix_caching=True),
    dict(num_kv_blocks=14, preemption_mode="swap", swap_space=0.01),
], ids=["recompute", "recompute-prefix-caching", "swap"])
def test_beam_parity_under_preemption(llms, case):
    llm = llms("llama", **case)
    engine = llm.llm_engine
    before = engine.scheduler.num_preemptions
    reqs = [(p, lp, es) for lp, es in [(1.0, False), (2.0, "never"), (0.5, True)] for p in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in reqs],
                        [params(4, lp, es) for _, lp, es in reqs], use_tqdm=False)
    assert engine.scheduler.num_preemptions > before
    for out, (p, lp, es) in zip(outs, reqs):
        assert_same(out, hf_beams(engine.config.model, p, 4, lp, es), lp)
    assert_all_free(engine)


def test_beams_share_prompt_blocks_and_wait_while_in_flight(llms):
    engine = llms("llama").llm_engine
    prompt = list(range(10, 30))  # 20 tokens: blocks 0 and 1 full, block 2 partial
    engine.add_request("shared", prompt, params(4, 1.0, False))
    sched, seen_wait, shared_refs = engine.scheduler, False, 0
    while engine.has_unfinished_requests():
        engine.step()
        group = next((r.beam for r in sched.running if r.beam is not None), None)
        if group is None:
            continue
        if len(group.beams) > 1:
            blocks = engine.kv.req_to_blocks[group.beams[0].request_id][:2]
            shared_refs = max(shared_refs, min(b.ref_cnt for b in blocks))
        if group.in_flight():
            # Its rows change once the in-flight step is read: nothing of it runs now.
            assert all(sched._waits_for_token(b) for b in group.beams)
            out = sched.schedule()
            assert not out.scheduled  # (the only request here)
            engine.runner.release_rows(out.freed_req_ids)
            seen_wait = True
    assert seen_wait
    assert shared_refs >= 4  # the prompt's full blocks are held by all four beams
    assert_all_free(engine)


def test_abort_frees_every_beam(llms):
    engine = llms("llama").llm_engine
    engine.add_request("gone", PROMPTS[1], params(4, 1.0, False))
    for _ in range(6):
        engine.step()
    assert len(engine.scheduler.running) > 1
    engine.abort_request("gone")
    while engine.scheduler.has_unfinished_requests():
        engine.step()
    engine.step()
    assert_all_free(engine)
    assert not engine.runner.batch.rows


def test_seed_form_repetition_penalty_and_beam_search_api(llms):
    llm = llms("qwen2")
    path = llm.llm_engine.config.model
    sp = SamplingParams(num_beams=4, temperature=0.0, max_tokens=MAX_TOKENS,
                        repetition_penalty=1.2, reuse_kv_cache=True)
    (out,) = llm.generate({"prompt_token_ids": PROMPTS[1]}, sp, use_tqdm=False)
    ((toks, score),) = hf_beams(path, PROMPTS[1], 4, 1.0, False, rep=1.2, nret=1)
    assert out.outputs[0].token_ids == toks and len(out.outputs) == 1
    res = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                          BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS,
                                           include_stop_str_in_output=True))
    for r, p in zip(res, PROMPTS):
        hf = hf_beams(path, p, 2, 1.0, False)
        assert [s.tokens for s in r.sequences] == [p + t for t, _ in hf]
        np.testing.assert_allclose([s.score for s in r.sequences], [s for _, s in hf],
                                   atol=1e-4)
        for s in r.sequences:
            assert s.cum_logprob == pytest.approx(sum(next(iter(d.values())).logprob
                                                      for d in s.logprobs))
            assert s.text == llm.get_tokenizer().decode(s.tokens, skip_special_tokens=True)


def test_beam_search_params_rejected():
    for bad in [dict(num_beams=0), dict(num_beams=2, n=2), dict(num_beams=2, top_p=0.5),
                dict(num_beams=2, stop=["x"]), dict(num_beams=2, early_stopping="soon"),
                dict(num_beams=2, num_return_sequences=3), dict(reuse_kv_cache=False)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)


def test_bench_beam_script_runs(llms, tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "scripts/bench_beam.py", "--model", llms("llama").llm_engine.config.model,
         "--num-prompts", "3", "--widths", "2", "--tp-prompts", "1", "--tp-width", "2",
         "--tp-max-tokens", "4", "--max-model-len", "128", "--kv-cache-memory", str(4 << 20)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| beam search | 2 |" in proc.stdout and "| parallel sampling | 2 |" in proc.stdout
    assert "ratio jpaged / HF:" in proc.stdout


def test_scheduler_preempts_and_readmits_beam_groups_whole():
    """A fake runner (every beam's candidates are tokens 7..10, no EOS): the
    later group is preempted whole when blocks run out, comes back whole,
    and every block is free at the end."""
    from jpaged.cache import KVCacheManager
    from jpaged.sched import Request, RequestStatus, Scheduler, SchedulerConfig
    from jpaged.sched.beam import BeamGroup

    kv = KVCacheManager(9, 4, enable_caching=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                  max_model_len=64), kv)
    for k, rid in enumerate(("a", "b")):
        sp = SamplingParams(num_beams=2, num_return_sequences=2, temperature=0, max_tokens=10)
        r = Request(request_id=rid, group_id=rid, prompt_token_ids=list(range(1 + k, 7 + k)),
                    sampling_params=sp, arrival_time=k, seed=0, max_tokens=10, forked=True)
        BeamGroup(r)
        s.add_request(r)
    groups = {rid: s.requests[rid].beam for rid in ("a", "b")}
    preempted_whole = False
    while s.has_unfinished_requests():
        out = s.schedule()
        cands = [([7, 8, 9, 10], [-1.0, -1.5, -2.0, -2.5]) for _ in out.scheduled]
        s.update_from_output(out, [[7] * sr.num_samples for sr in out.scheduled], cands)
        b = groups["b"]
        states = {r.status for r in b.beams}
        assert len(states) == 1 or b.state.done, "a group is never split between running and waiting"
        if states == {RequestStatus.WAITING} and len(b.beams) == 2:
            preempted_whole = True
            assert all(not kv.get_block_ids(r.request_id) for r in b.beams)
    assert preempted_whole and s.num_preemptions >= 2
    assert [g.state.done for g in groups.values()] == [True, True]
    assert [len(g.state.finished) for g in groups.values()] == [2, 2]
    assert kv.num_free_blocks == kv.num_blocks - 1 and not kv.req_to_blocks


def test_scheduler_never_splits_a_beam_group_for_a_plain_request():
    """A plain request that needs a block takes it from the last-arrived beam
    group: the whole group goes (never one beam alone), and comes back."""
    from jpaged.cache import KVCacheManager
    from jpaged.sched import Request, RequestStatus, Scheduler, SchedulerConfig
    from jpaged.sched.beam import BeamGroup

    kv = KVCacheManager(9, 4, enable_caching=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                  max_model_len=64), kv)
    s.add_request(Request(request_id="a", group_id="a", prompt_token_ids=list(range(1, 11)),
                          sampling_params=SamplingParams(max_tokens=14), arrival_time=0,
                          seed=0, max_tokens=14, forked=True))
    sp = SamplingParams(num_beams=2, num_return_sequences=2, temperature=0, max_tokens=9)
    b = Request(request_id="b", group_id="b", prompt_token_ids=[20, 21, 22], sampling_params=sp,
                arrival_time=1, seed=0, max_tokens=9, forked=True)
    group = BeamGroup(b)
    s.add_request(b)
    split = preempted = False
    while s.has_unfinished_requests():
        out = s.schedule()
        cands = [([7, 8, 9, 10], [-1.0, -1.1, -2.0, -2.5]) for _ in out.scheduled]
        s.update_from_output(out, [[7] * sr.num_samples for sr in out.scheduled], cands)
        a = s.requests.get("a")
        if a is not None and a.num_output_tokens >= 14:
            s.finish_requests(["a"], RequestStatus.FINISHED_LENGTH)
        states = {r.status for r in group.beams}
        split |= len(states) > 1
        preempted |= states == {RequestStatus.WAITING}
    assert preempted and not split
    assert group.state.done and len(group.state.finished) == 2
    assert kv.num_free_blocks == kv.num_blocks - 1 and not kv.req_to_blocks


def test_beam_candidates_apply_logits_processors(llms):
    """allowed_token_ids (a logits processor) holds for every beam: the step's
    beam candidates are taken after the processors, as sampled tokens are."""
    llm = llms("llama")
    allowed = [11, 57, 300, 420]
    sp = params(2, 1.0, False, allowed_token_ids=allowed)
    (out,) = llm.generate({"prompt_token_ids": PROMPTS[0]}, sp, use_tqdm=False)
    assert len(out.outputs) == 2
    for c in out.outputs:
        assert len(c.token_ids) == MAX_TOKENS and set(c.token_ids) <= set(allowed)
    assert_all_free(llm.llm_engine)


def test_beam_search_past_its_deadline_ends_whole(llms):
    """A running beam search past deadline_ms ends as a group: its live beams
    become its hypotheses and every beam's blocks go back."""
    engine = llms("llama").llm_engine
    t = [1000.0]
    clock, engine.scheduler.clock = engine.scheduler.clock, lambda: t[0]
    try:
        engine.add_request("late", PROMPTS[1], params(4, 1.0, "never", deadline_ms=500))
        outs = []
        for _ in range(6):
            outs += engine.step()
        assert not outs and len(engine.scheduler.running) > 1
        t[0] += 0.5
        while engine.has_unfinished_requests():
            outs += engine.step()
        engine.step()
    finally:
        engine.scheduler.clock = clock
    (out,) = outs
    assert out.finished and out.request_id == "late" and len(out.outputs) == 4
    assert all(0 < len(c.token_ids) < MAX_TOKENS for c in out.outputs)
    assert any(c.finish_reason == "length" for c in out.outputs)
    assert_all_free(engine)
    assert not engine.runner.batch.rows

"""The last layer on the sample rows only (`jpaged.layers.attention.RowSelection`):
a step with more tokens than sequences runs its last layer's attention,
o_proj and MLP on the rows it samples, and gives the same tokens and
logprobs as running it on every token."""

import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.runner import model_runner
from jpaged.tiny import make_tiny_model


def run(model_dir, prompts, params, select, monkeypatch, **kw):
    calls = []
    real = model_runner.select_rows

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(model_runner, "select_rows", spy)
        if not select:
            mp.setattr(model_runner.ModelRunner, "_selects_rows", lambda *a: False)
        llm = LLM(model_dir, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64,
                  block_size=8, compile_all_buckets=False, **kw)
        outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, len(calls)


def prompts_for(n, seed=0):
    rng = np.random.default_rng(seed)
    # Longer than the 64-token budget (chunked: mid-prefill rows sample
    # nothing) and shorter, so steps mix prefill chunks and decodes.
    return [[int(t) for t in rng.integers(3, 500, k)] for k in (150, 9, 70, 33, 5, 120)[:n]]


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("mistral", {"sliding_window": 24}),
                                     ("qwen2", {})])
def test_same_tokens_and_logprobs(tmp_path, monkeypatch, arch, kw):
    model_dir = str(tmp_path / arch)
    make_tiny_model(model_dir, arch=arch, num_hidden_layers=3, **kw)
    prompts = prompts_for(6)
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.8, seed=7, max_tokens=5, ignore_eos=True, n=2)] * 3
    on, traced_on = run(model_dir, prompts, params, True, monkeypatch)
    off, traced_off = run(model_dir, prompts, params, False, monkeypatch)
    assert traced_on > 0 and traced_off == 0  # the 64-token step (4 sequences) selects
    for a, b in zip(on, off):
        assert len(a.outputs) == len(b.outputs)
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            if x.logprobs:
                for lx, ly in zip(x.logprobs, y.logprobs):
                    assert lx.keys() == ly.keys()
                    for t in lx:
                        assert lx[t].logprob == pytest.approx(ly[t].logprob, abs=1e-4)


def test_prompt_logprobs_and_fp8_cache(tmp_path, monkeypatch):
    """A step with prompt logprobs keeps every row (they all need logits);
    the fp8 cache's per-layer scales reach the selected last layer."""
    model_dir = str(tmp_path / "m")
    make_tiny_model(model_dir, arch="llama", num_hidden_layers=2)
    prompts = prompts_for(3, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
    for kw in ({}, {"kv_cache_dtype": "fp8_e4m3"}):
        on, _ = run(model_dir, prompts, params, True, monkeypatch, **kw)
        off, _ = run(model_dir, prompts, params, False, monkeypatch, **kw)
        for a, b in zip(on, off):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
        plp_on, plp_off = on[0].prompt_logprobs, off[0].prompt_logprobs
        assert len(plp_on) == len(prompts[0])
        for x, y in zip(plp_on[1:], plp_off[1:]):
            for t in x:
                assert x[t].logprob == pytest.approx(y[t].logprob, abs=1e-4)


def test_more_sample_rows_than_the_few(tmp_path, monkeypatch):
    """Steps with more sequences than `FEW_LOGIT_ROWS` run the selected layer
    on the first 32 rows when the sampling ones all lie there, else on all:
    both give the tokens of the unselected step."""
    model_dir = str(tmp_path / "m")
    make_tiny_model(model_dir, arch="llama", num_hidden_layers=2)
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, 500, k)]
               for k in [6] * 36 + [150, 90]]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)] * 38
    steps = []
    real = model_runner.ModelRunner.dispatch

    def dispatch(self, out):
        steps.append((out.num_scheduled_tokens,
                      sum(1 for sr in out.scheduled if sr.num_samples)))
        return real(self, out)

    outs = {}
    for select in (True, False):
        with monkeypatch.context() as mp:
            mp.setattr(model_runner.ModelRunner, "dispatch", dispatch)
            if not select:
                mp.setattr(model_runner.ModelRunner, "_selects_rows", lambda *a: False)
            llm = LLM(model_dir, max_num_seqs=40, max_model_len=256, max_num_batched_tokens=128,
                      block_size=8, compile_all_buckets=False)
            outs[select] = llm.generate(prompts, params, use_tqdm=False)
    # More tokens than the 40 sequence rows, with more and with fewer than 32
    # rows sampling.
    assert any(t > 40 and n > 32 for t, n in steps), steps
    assert any(t > 40 and 0 < n <= 32 for t, n in steps), steps
    for a, b in zip(outs[True], outs[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for lx, ly in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in lx:
                assert lx[t].logprob == pytest.approx(ly[t].logprob, abs=1e-4)

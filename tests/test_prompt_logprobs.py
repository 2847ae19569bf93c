"""Prompt logprobs (``SamplingParams(prompt_logprobs=k)``) against
transformers' log-softmax of the prompt positions (float32 tiny model),
through chunked prefill, prefix caching and preemption."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import SMALL, assert_all_blocks_free, make_prompts

from jpaged import LLM, SamplingParams

ATOL = 2e-4  # float32 on both sides; summation orders differ


def hf_log_softmax(model_dir, prompt):
    """[len(prompt), V] log-softmax of transformers' logits at each position."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def check_against_hf(plp, prompt, ref, k):
    assert plp[0] is None and len(plp) == len(prompt)
    for p in range(1, len(prompt)):
        entry, row, tok = plp[p], ref[p - 1], prompt[p]
        assert tok in entry, f"prompt token missing at position {p}"
        assert abs(entry[tok].logprob - row[tok]) < ATOL, (p, entry[tok].logprob, row[tok])
        assert entry[tok].rank == int(np.sum(row > row[tok])) + 1
        top = np.argsort(-row)[:k]
        others = {t: lp for t, lp in entry.items() if t != tok or lp.rank <= k}
        assert sorted(t for t, lp in others.items() if lp.rank <= k) == sorted(top.tolist())
        assert len(entry) == (k if tok in top else k + 1)
        for t in top:
            assert abs(entry[int(t)].logprob - row[t]) < ATOL


@pytest.fixture(scope="module")
def long_prompt():
    return make_prompts(seed=7, lens=(150,))[0]


def test_chunked_prompt_logprobs_equal_transformers(llama_dir, long_prompt):
    # 150 prompt tokens over a 32-token budget: five prefill chunks.
    llm = LLM(llama_dir, **{**SMALL, "max_num_batched_tokens": 32})
    out = llm.generate([long_prompt], SamplingParams(temperature=0, max_tokens=3,
                                                      prompt_logprobs=5), use_tqdm=False)[0]
    check_against_hf(out.prompt_logprobs, long_prompt, hf_log_softmax(llama_dir, long_prompt), 5)
    assert len(out.outputs[0].token_ids) == 3
    # k = 0: the prompt token alone.
    out0 = llm.generate([long_prompt], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)[0]
    assert all(len(e) == 1 for e in out0.prompt_logprobs[1:])
    assert_all_blocks_free(llm)


def test_tensor_parallel_prompt_logprobs(llama_dir, long_prompt):
    """Under TP the logits are split by vocabulary, then gathered to score."""
    prompt = long_prompt[:40]
    llm = LLM(llama_dir, tensor_parallel_size=2, **{**SMALL, "max_num_batched_tokens": 16})
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    check_against_hf(out.prompt_logprobs, prompt, hf_log_softmax(llama_dir, prompt), 3)


def test_prefix_cache_is_bypassed_and_preemption(llama_dir, long_prompt):
    """A cached prompt is recomputed for its logprobs; requests without them
    still hit the cache; preemption leaves the entries whole."""
    llm = LLM(llama_dir, block_size=16, num_kv_blocks=24, **SMALL)
    plain = SamplingParams(temperature=0, max_tokens=4)
    first = llm.generate([long_prompt], plain, use_tqdm=False)[0]
    assert first.prompt_logprobs is None
    sp = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)
    scored = llm.generate([long_prompt], sp, use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0
    again = llm.generate([long_prompt], plain, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    ref = hf_log_softmax(llama_dir, long_prompt)
    check_against_hf(scored.prompt_logprobs, long_prompt, ref, 2)
    # Under preemption (24 blocks for several long prompts): still whole and right.
    prompts = [long_prompt[:100 + 7 * i] for i in range(4)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30,
                                                prompt_logprobs=1), use_tqdm=False)
    assert llm.llm_engine.get_stats().num_preemptions > 0
    for p, o in zip(prompts, outs):
        check_against_hf(o.prompt_logprobs, p, ref[:len(p)], 1)
    assert_all_blocks_free(llm)


def test_limit_and_bad_values(llama_dir):
    llm = LLM(llama_dir, max_logprobs=4, compile_all_buckets=False, **SMALL)
    with pytest.raises(ValueError, match="prompt_logprobs=5 is over max_logprobs=4"):
        llm.generate(["hi"], SamplingParams(prompt_logprobs=5), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_delta_outputs_carry_prompt_logprobs_once(llama_dir, long_prompt):
    llm = LLM(llama_dir, **SMALL)
    engine = llm.llm_engine
    engine.add_request("d", long_prompt[:40], SamplingParams(
        temperature=0, max_tokens=3, prompt_logprobs=1, output_kind="delta"))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.prompt_logprobs for o in engine.step()]
    assert len(seen) == 3 and len(seen[0]) == 40 and seen[1] is None and seen[2] is None


def test_scoring_in_token_chunks_equals_one_pass(monkeypatch):
    """`score_prompt` cuts long steps into chunks (padding the last): the same
    figures as one pass, and as a plain log-softmax."""
    import jax
    import jax.numpy as jnp

    from jpaged.sample import prompt_logprobs as m

    h = jax.random.normal(jax.random.key(0), (600, 8))
    w = jax.random.normal(jax.random.key(1), (8, 50))
    tg = jnp.asarray(np.random.default_rng(0).integers(-1, 50, 600), jnp.int32)
    monkeypatch.setattr(m, "SCORE_CHUNK", 256)
    chunked = m.score_prompt(lambda x: x @ w, h, tg, 5)
    lsm = np.asarray(jax.nn.log_softmax(h @ w, axis=-1))
    np.testing.assert_allclose(np.asarray(chunked[0]), lsm[np.arange(600), np.maximum(tg, 0)],
                               rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(m, "SCORE_CHUNK", 1024)
    whole = m.score_prompt(lambda x: x @ w, h, tg, 5)
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

"""Sampling through the engine: seeds, filters, penalties, stops, logprobs, n > 1,
input validation, and no compile after warm-up."""

import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from test_engine import assert_all_blocks_free, make_prompts

CFG = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=8)


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def llm(request, llama_dir):
    return LLM(llama_dir, async_scheduling=request.param, **CFG)


def gen(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def test_seeded_sample_same_alone_and_in_mixed_batch(llm):
    prompts = make_prompts(seed=3, lens=(7, 19, 30, 4, 11))
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    alone = gen(llm, [prompts[0]], sp)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, top_k=5, max_tokens=20),
              SamplingParams(temperature=0, max_tokens=9),
              SamplingParams(temperature=1.3, min_p=0.05, seed=9, max_tokens=12),
              SamplingParams(temperature=1.0, max_tokens=5)]
    mixed = gen(llm, prompts, [sp] + others)[0].outputs[0].token_ids
    assert alone == mixed
    # A different seed gives a different sample (overwhelmingly likely over 16 tokens).
    other = gen(llm, [prompts[0]], SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                                                  max_tokens=16))[0].outputs[0].token_ids
    assert other != alone
    assert_all_blocks_free(llm)


def test_top_k_1_equals_greedy(llm):
    prompts = make_prompts(seed=4, lens=(5, 17, 26))
    greedy = [o.outputs[0].token_ids for o in gen(llm, prompts, SamplingParams(
        temperature=0, max_tokens=12))]
    topk1 = [o.outputs[0].token_ids for o in gen(llm, prompts, SamplingParams(
        temperature=1.5, top_k=1, max_tokens=12))]
    assert topk1 == greedy


def test_sampling_distribution_respects_top_k(llm):
    """With top_k=3, every sampled token is among the top 3 logprobs."""
    p = make_prompts(seed=6, lens=(9,))
    out = gen(llm, p, SamplingParams(temperature=2.0, top_k=3, logprobs=3, seed=1,
                                     max_tokens=20))[0].outputs[0]
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp[tok].rank <= 3
        assert len(lp) == 3  # the sampled token is one of the top 3


def test_logprobs_are_log_softmax(llm):
    p = make_prompts(seed=7, lens=(12,))
    out = gen(llm, p, SamplingParams(temperature=0, logprobs=5, max_tokens=6))[0].outputs[0]
    assert len(out.logprobs) == 6
    total = 0.0
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp[tok].rank == 1  # greedy picks the most likely token
        vals = sorted((v.logprob for v in lp.values()), reverse=True)
        assert all(v <= 0 for v in vals) and len(lp) == 5
        total += lp[tok].logprob
    assert out.cumulative_logprob == pytest.approx(total, rel=1e-5)


def _straddling_stop(llm, prompt):
    """A 2-3 character stop string that ends one token later than it starts."""
    full = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
    tok = llm.get_tokenizer()
    pieces = [tok.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    for i in range(1, len(pieces) - 1):
        a, b = len(pieces[i]), len(pieces[i + 1])
        stop = full.text[a - 1:min(b, a + 2)]
        if (a >= 1 and b > a and pieces[i + 1] == full.text[:b]
                and "\ufffd" not in stop and not stop.isspace()):
            return full.text, stop
    return full.text, None


def test_stop_string_straddling_tokens(llm):
    for seed in range(8, 30):
        text, stop = _straddling_stop(llm, make_prompts(seed=seed, lens=(10,))[0])
        if stop:
            break
    assert stop, "no output text had a clean token boundary to straddle"
    p = make_prompts(seed=seed, lens=(10,))
    first = text.find(stop)
    out = gen(llm, p, SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0].outputs[0]
    assert out.text == text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out2 = gen(llm, p, SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                      include_stop_str_in_output=True))[0].outputs[0]
    assert out2.text == text[:first + len(stop)]


def test_stop_token_ids_min_tokens_and_ignore_eos(llm):
    p = make_prompts(seed=9, lens=(6,))
    full = gen(llm, p, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    target = full.token_ids[5]
    out = gen(llm, p, SamplingParams(temperature=0, max_tokens=20,
                                     stop_token_ids=[target]))[0].outputs[0]
    k = full.token_ids.index(target)
    assert out.token_ids == full.token_ids[:k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    # min_tokens bans the stop token until enough tokens exist.
    out = gen(llm, p, SamplingParams(temperature=0, max_tokens=20, min_tokens=k + 2,
                                     stop_token_ids=[target]))[0].outputs[0]
    assert target not in out.token_ids[:k + 2]
    assert len(out.token_ids) >= k + 2


def test_n4_parallel_samples_share_prompt_blocks(llm):
    engine = llm.llm_engine
    p = make_prompts(seed=10, lens=(30,))[0]
    engine.add_request("n4", p, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10))
    outputs = []
    while not outputs:  # prefill: one sequence, four samples (async: read a step later)
        outputs = engine.step()
    assert len(outputs) == 1 and len(outputs[0].outputs) == 4
    ids = [engine.kv.get_block_ids(f"n4#{k}") for k in (1, 2, 3)] + [engine.kv.get_block_ids("n4")]
    assert all(i == ids[0] for i in ids)  # all four share the prompt's blocks
    shared = engine.kv.pool.blocks[ids[0][0]]
    assert shared.ref_cnt == 4
    while engine.has_unfinished_requests():
        outputs = engine.step() or outputs
    final = outputs[0]
    assert final.finished and [o.index for o in final.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 10 for o in final.outputs)
    assert len({tuple(o.token_ids) for o in final.outputs}) > 1
    # The full prompt blocks stay shared after copy-on-write of the last one.
    assert_all_blocks_free(llm)


def _penalized_greedy_oracle(model_dir, prompt, n, rep, freq, pres):
    """Greedy decoding with vLLM's penalty formulas over transformers' logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].numpy().astype(np.float64)
            out = seq[len(prompt):]
            counts = np.bincount(out, minlength=logits.size) if out else np.zeros(logits.size)
            seen = counts > 0
            seen[list(set(prompt))] = True
            logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
            logits -= freq * counts + pres * (counts > 0)
            seq.append(int(np.argmax(logits)))
    return seq[len(prompt):]


def test_penalties_match_oracle_and_are_per_request(llm, llama_dir):
    # A prompt that repeats itself, so that penalties bite from the first token.
    p = make_prompts(seed=11, lens=(6,))[0] * 3
    kw = dict(repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4)
    base = gen(llm, [p], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].token_ids
    pen = gen(llm, [p], SamplingParams(temperature=0, max_tokens=24, **kw))[0].outputs[0]
    assert pen.token_ids == _penalized_greedy_oracle(
        llama_dir, p, 24, kw["repetition_penalty"], kw["frequency_penalty"],
        kw["presence_penalty"])
    assert pen.token_ids != base
    # Mixed batch: penalised and plain requests do not affect each other.
    both = gen(llm, [p, p], [SamplingParams(temperature=0, max_tokens=24),
                             SamplingParams(temperature=0, max_tokens=24, **kw)])
    assert both[0].outputs[0].token_ids == base
    assert both[1].outputs[0].token_ids == pen.token_ids


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1), "temperature=-1"), (dict(top_p=0), "top_p=0"),
    (dict(top_k=-5), "top_k=-5"), (dict(n=0), "n=0"), (dict(max_tokens=0), "max_tokens=0"),
    (dict(min_p=2.0), "min_p=2.0"), (dict(presence_penalty=9), "presence_penalty=9"),
    (dict(repetition_penalty=0), "repetition_penalty=0"), (dict(seed=-1), "seed=-1"),
    (dict(logprobs=-1), "logprobs=-1"), (dict(temperature=float("nan")), "temperature=nan"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens=5"), (dict(stop=[""]), "stop"),
    (dict(top_k=2**31), "top_k=2147483648"), (dict(stop_token_ids=[2**40]), "stop_token_ids"),
    (dict(temperature=1e30), "temperature=1e\\+30"),
])
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_invalid_requests_leave_engine_intact(llm):
    e = llm.llm_engine
    with pytest.raises(ValueError, match="max_model_len=256"):
        e.add_request("a", [5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        e.add_request("b", "", SamplingParams())
    with pytest.raises(ValueError, match="token id 99999"):
        e.add_request("c", [1, 99999], SamplingParams())
    with pytest.raises(ValueError, match="logprobs=50"):
        e.add_request("d", [1, 2], SamplingParams(logprobs=50))
    assert not e.has_unfinished_requests()
    assert gen(llm, [[5, 6, 7]], SamplingParams(max_tokens=3))[0].finished


def test_request_larger_than_cache_fails_fast(llama_dir):
    llm = LLM(llama_dir, max_num_seqs=2, max_num_batched_tokens=32, max_model_len=256,
              block_size=8, num_kv_blocks=5)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([[3] * 40], SamplingParams(max_tokens=10), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_abort_frees_blocks(llm):
    e = llm.llm_engine
    for i, p in enumerate(make_prompts(seed=12, lens=(20, 30, 9))):
        e.add_request(f"ab{i}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    e.step()
    e.step()
    e.abort_request(["ab0", "ab1", "ab2"])
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_no_compile_after_warmup(llama_dir, async_scheduling, preemption_mode):
    llm = LLM(llama_dir, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
              block_size=8, num_kv_blocks=40, async_scheduling=async_scheduling,
              preemption_mode=preemption_mode, swap_space=0.01)
    e = llm.llm_engine
    before = e.runner.num_compiles
    # Swaps pad to powers of two: gather + scatter for 1..64 blocks (39 usable).
    swap_sizes = 0 if preemption_mode == "recompute" else 2 * 7
    assert before == len(e.runner.buckets) + swap_sizes
    rng = np.random.default_rng(0)
    prompts = make_prompts(seed=13, lens=tuple(int(x) for x in rng.integers(1, 90, 14)))
    params = [SamplingParams(temperature=float(rng.uniform(0, 1.5)), top_p=0.9, top_k=int(k),
                             max_tokens=int(rng.integers(1, 40)), logprobs=int(k) % 3 or None,
                             n=1 + int(k) % 2, presence_penalty=0.5 * (k % 2), seed=int(k))
              for k in rng.integers(0, 10, len(prompts))]
    llm.generate(prompts, params, use_tqdm=False)
    assert e.runner.num_compiles == before
    assert e.get_stats().num_preemptions > 0  # the small cache made it preempt, too
    assert_all_blocks_free(llm)


# ------------------------------------------- the sampler alone, by hand
def _metadata(num_rows, vocab, **over):
    import jax.numpy as jnp

    from jpaged.sample.sampler import SamplingMetadata

    f = lambda v: jnp.full((num_rows,), v, jnp.float32)  # noqa: E731
    i = lambda v: jnp.full((num_rows,), v, jnp.int32)  # noqa: E731
    md = dict(temperature=f(1.0), top_k=i(0), top_p=f(1.0), min_p=f(0.0),
              presence_penalty=f(0.0), frequency_penalty=f(0.0), repetition_penalty=f(1.0),
              seeds=jnp.tile(jnp.array([[1234, 0]], jnp.uint32), (num_rows, 1)),
              sample_index=i(0), output_len=i(0), prompt_len=i(1),
              token_rows=jnp.arange(num_rows, dtype=jnp.int32),
              banned=jnp.full((num_rows, 4), vocab, jnp.int32),
              any_penalty=jnp.array(False), any_filter=jnp.array(False),
              any_logprobs=jnp.array(False), any_random=jnp.array(True),
              any_beam=jnp.array(False))
    md.update(over)
    return SamplingMetadata(**md)


def _draw(logits, md):
    import jax.numpy as jnp

    from jpaged.sample.sampler import sample

    table = jnp.zeros((logits.shape[0], 8), jnp.int32)
    return np.asarray(sample(logits, md, table, 1)[0])


@pytest.mark.parametrize("top_p,kept", [(0.7, 2), (0.5, 1), (0.95, 3)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    """Probabilities [0.5, 0.3, 0.2]: top_p 0.7 keeps exactly two tokens."""
    import jax.numpy as jnp

    from jpaged.sample.sampler import _filter

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]], jnp.float32))
    out = np.asarray(_filter(logits, _metadata(1, 3, top_p=jnp.array([top_p], jnp.float32))))
    assert np.isfinite(out[0]).sum() == kept
    assert np.isfinite(out[0, :kept]).all()


def test_n_samples_draw_different_first_tokens():
    """n samples of one request share seed and position; only the sample
    index tells their draws apart."""
    import jax.numpy as jnp

    n, vocab = 8, 1000
    logits = jnp.zeros((n, vocab), jnp.float32)  # uniform
    md = _metadata(n, vocab, sample_index=jnp.arange(n, dtype=jnp.int32))
    toks = _draw(logits, md)
    assert len(set(toks.tolist())) >= n - 1, toks
    same = _draw(logits, _metadata(n, vocab))  # one sample index: one draw
    assert len(set(same.tolist())) == 1


def test_banned_tokens_stay_banned_at_the_highest_temperature():
    """At MAX_TEMPERATURE, min_tokens bans (-inf logits) still hold: no NaN."""
    import jax.numpy as jnp

    from jpaged.sampling_params import MAX_TEMPERATURE

    rows, vocab = 64, 6
    logits = jnp.tile(jnp.array([[9.0, 0, 0, 0, 0, 0]], jnp.float32), (rows, 1))
    banned = jnp.tile(jnp.array([[0, vocab, vocab, vocab]], jnp.int32), (rows, 1))
    md = _metadata(rows, vocab, temperature=jnp.full((rows,), MAX_TEMPERATURE, jnp.float32),
                   banned=banned, sample_index=jnp.arange(rows, dtype=jnp.int32))
    toks = _draw(logits, md)
    assert 0 not in toks.tolist() and len(set(toks.tolist())) > 1


def test_min_tokens_boundary_is_exact(llm):
    """A stop token at output index k is allowed with min_tokens=k and
    banned there with min_tokens=k+1."""
    p = make_prompts(seed=9, lens=(6,))
    full = gen(llm, p, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    target = full.token_ids[5]
    k = full.token_ids.index(target)
    at = gen(llm, p, SamplingParams(temperature=0, max_tokens=20, min_tokens=k,
                                    stop_token_ids=[target]))[0].outputs[0]
    assert at.token_ids == full.token_ids[:k + 1] and at.finish_reason == "stop"
    past = gen(llm, p, SamplingParams(temperature=0, max_tokens=20, min_tokens=k + 1,
                                      stop_token_ids=[target]))[0].outputs[0]
    assert past.token_ids[:k] == full.token_ids[:k] and past.token_ids[k] != target


def test_argmax_last_is_jnp_argmax():
    import jax.numpy as jnp

    from jpaged.sample.sampler import argmax_last

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, [7, 300]] = 50.0  # a tie: the first wins
    x[2, :] = -np.inf  # every token banned
    x[3, [10, 20]] = np.nan  # NaN: the first NaN, like jnp.argmax
    x[4, 999] = 1e30  # the last column
    x[5, :] = 0.0
    want = np.asarray(jnp.argmax(jnp.asarray(x), axis=-1))
    assert want.tolist() == [want[0], 7, 0, 10, 999, 0]
    np.testing.assert_array_equal(np.asarray(argmax_last(jnp.asarray(x))), want)

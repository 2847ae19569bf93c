"""Long contexts on the CPU: a 16,000-token prompt decodes greedily as
transformers does, and a 100,000-token prompt runs end to end with blocks of
64 and 128 tokens in a KV cache of exactly the blocks it needs (chunked
prefill; prefill chunks attend in query tiles, layers/attention_cpu.py)."""

import numpy as np
import pytest

from jpaged import LLM, SamplingParams


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> float:
    """Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the
    current RSS, so a later peak belongs to this test and not to earlier ones
    in the same pytest process (ru_maxrss cannot be reset). Returns the RSS
    now, in GiB: what the process held before this test began."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") / 2**20


def peak_rss_gib() -> float:
    return _status_kib("VmHWM") / 2**20


def prompt(n, seed=0, vocab=1000):
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    from conftest import tiny_model

    return tiny_model(tmp_path_factory, "long-llama", max_position_embeddings=131072)


@pytest.fixture(scope="module")
def long_thin_dir(tmp_path_factory):
    # One thin layer: 100k tokens of causal attention are ~5e11 multiply-adds
    # per layer-width unit; this keeps the run near a minute on two cores.
    from conftest import tiny_model

    return tiny_model(tmp_path_factory, "long-thin", hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=131072)


def test_greedy_16k_equals_transformers(long_dir):
    import torch
    from transformers import AutoModelForCausalLM

    p = prompt(16_000)
    llm = LLM(long_dir, block_size=64, max_model_len=16_064, max_num_seqs=2,
              max_num_batched_tokens=2048, compile_all_buckets=False)
    got = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    model = AutoModelForCausalLM.from_pretrained(long_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12,
                             attention_mask=torch.ones(1, len(p), dtype=torch.long))
    assert got == ids[0, len(p):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [64, 128])
def test_100k_prompt_in_exactly_the_blocks_it_needs(long_thin_dir, block_size):
    n, max_tokens = 100_000, 4
    need = -(-(n + max_tokens) // block_size)
    before = reset_peak_rss()
    llm = LLM(long_thin_dir, block_size=block_size, max_model_len=n + 64, max_num_seqs=1,
              max_num_batched_tokens=4096, num_kv_blocks=need + 1,  # + the null block
              enable_prefix_caching=False, compile_all_buckets=False)
    eng = llm.llm_engine
    assert eng.kv.num_blocks == need + 1
    out = llm.generate([prompt(n, seed=1)],
                       SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == max_tokens
    assert out.outputs[0].finish_reason == "length" and eng.scheduler.num_preemptions == 0
    # Host memory stays far below anything quadratic (100k^2 floats is 40 GB).
    grew = peak_rss_gib() - before
    print(f"host RSS grew by at most {grew:.2f} GiB (from {before:.2f} GiB)")
    assert grew < 2, grew
    assert eng.kv.num_free_blocks == eng.kv.num_blocks - 1


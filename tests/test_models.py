"""Flax models against Hugging Face transformers (PyTorch CPU) on tiny checkpoints."""

import numpy as np
import pytest

from conftest import tiny_model
from helpers import hf_logits, prefill_logits
from jpaged.model_loader.loader import load_model

# Prompts of different lengths, several spanning multiple blocks of 8.
PROMPT_LENS = (1, 5, 8, 17, 40)

VARIANTS = {
    "llama": dict(arch="llama"),
    "mistral": dict(arch="mistral", sliding_window=4096),
    "qwen2": dict(arch="qwen2"),
    "llama31_rope": dict(arch="llama", rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}),
    "tied": dict(arch="llama", tie_word_embeddings=True),
    "gqa4": dict(arch="llama", num_attention_heads=8, num_key_value_heads=2),
    "mha_head_dim": dict(arch="qwen2", num_attention_heads=4, num_key_value_heads=4,
                         head_dim=32),
}


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(3, vocab, n)] for n in PROMPT_LENS]


def _rel_err(ours, theirs):
    return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers_fp32(tmp_path_factory, variant):
    path = tiny_model(tmp_path_factory, variant, **VARIANTS[variant])
    cfg, graphdef, params = load_model(path, dtype="float32")
    prompts = _prompts(900)
    err = _rel_err(prefill_logits(cfg, graphdef, params, prompts), hf_logits(path, prompts))
    print(f"{variant}: max relative logit error {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_logits_match_transformers_bf16(tmp_path_factory, variant):
    # bfloat16 has an 8-bit mantissa (relative step 2**-8 = 3.9e-3); matmul
    # accumulation order differs between XLA and PyTorch, so after a few
    # layers logits agree to a few bf16 steps: we allow 5e-2 of the logit range.
    path = tiny_model(tmp_path_factory, variant, **VARIANTS[variant])
    cfg, graphdef, params = load_model(path, dtype="bfloat16")
    prompts = _prompts(900, seed=1)
    err = _rel_err(prefill_logits(cfg, graphdef, params, prompts),
                   hf_logits(path, prompts, dtype="bfloat16"))
    print(f"{variant} bf16: max relative logit error {err:.2e}")
    assert err < 5e-2


def test_ragged_batch_equals_one_by_one(llama_dir):
    """Batching prompts together must not change any prompt's logits."""
    cfg, graphdef, params = load_model(llama_dir)
    prompts = _prompts(900, seed=2)
    together = prefill_logits(cfg, graphdef, params, prompts, block_size=16)
    for p, t in zip(prompts, together):
        alone = prefill_logits(cfg, graphdef, params, [p], block_size=16)[0]
        np.testing.assert_allclose(alone, t, rtol=1e-5, atol=1e-5)

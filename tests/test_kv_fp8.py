"""The fp8 KV cache (``kv_cache_dtype="fp8_e4m3"``): quantization bounds,
the Pallas kernels (interpreted; on a GPU also compiled) against the reference on the same fp8
cache, the KV budget, the engine's greedy output against the float cache,
block accounting under prefix caching and preemption, scales from a
checkpoint, and bad values."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_gpu_or_skip
from test_engine import SMALL, assert_all_blocks_free, make_prompts, run_greedy
from test_kernels import make_case

from jpaged import LLM
from jpaged.layers.attention_cpu import cpu_paged_attention
from jpaged.layers.kv_quant import FP8, FP8_MAX, dequantize, load_kv_scales, quantize
from jpaged.pallas_kernels.attention.decode import paged_decode_attention
from jpaged.pallas_kernels.attention.ragged import ragged_paged_attention
from jpaged.pallas_kernels.attention.reference import (
    paged_decode_attention_reference,
    ragged_paged_attention_reference,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# e4m3 keeps 3 mantissa bits: round to nearest is within 2**-4 of a normal value.
REL_BOUND = 2.0 ** -4
SCALES = (0.5, 2.0)  # k_scale, v_scale: both directions of the division


@pytest.mark.parametrize("scale", [1.0, 0.25, 3.0])
def test_round_trip_within_bound_and_saturates(scale):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096).astype(np.float32) * 40 * scale
    # Normal range of e4m3 after the division: |x / scale| >= 2**-6.
    x = x[np.abs(x / scale) >= 2.0 ** -6]
    q = quantize(jnp.asarray(x), scale)
    assert q.dtype == FP8
    back = np.asarray(dequantize(q, scale))
    assert np.all(np.abs(back - x) <= REL_BOUND * np.abs(x) + 1e-12)
    # Past +-448 * scale the cast saturates instead of giving NaN.
    big = np.array([1e6, -1e6, 448.0 * scale * 1.5], np.float32)
    sat = np.asarray(dequantize(quantize(jnp.asarray(big), scale), scale))
    np.testing.assert_allclose(sat, np.array([1, -1, 1]) * FP8_MAX * scale, rtol=1e-6)


def _fp8(case, ks, vs):
    return quantize(case["k"], ks), quantize(case["v"], vs)


DEVICES = pytest.mark.parametrize("interpret", [True, False], ids=["interpret", "gpu"])


@DEVICES
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_decode_kernel_fp8_equals_reference(dtype, rtol, interpret):
    if not interpret:
        require_gpu_or_skip("fp8 Triton kernels")
    ctx = [1, 37, 0, 16, 70]
    case = make_case(3, [(1 if c else 0, c) for c in ctx], pad_tokens=0)
    k8, v8 = _fp8(case, *SCALES)
    q = jax.random.normal(jax.random.key(1), (len(ctx),) + case["q"].shape[1:]).astype(dtype)
    args = (case["block_tables"], case["context_lens"])
    kw = dict(scale=q.shape[-1] ** -0.5, k_scale=SCALES[0], v_scale=SCALES[1])
    ref = paged_decode_attention_reference(q, k8, v8, *args, **kw)
    for splits in (1, 3):
        out = paged_decode_attention(q, k8, v8, *args, interpret=interpret, num_splits=splits,
                                     **kw)
        _close(out, ref, rtol)
        assert np.all(np.asarray(out)[np.array(ctx) == 0] == 0)
    # The scales matter: the reference without them is far off.
    assert _err(paged_decode_attention_reference(q, k8, v8, *args, scale=kw["scale"]),
                ref) > 0.1


@DEVICES
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_ragged_kernel_and_cpu_backend_fp8_equal_reference(dtype, rtol, interpret):
    if not interpret:
        require_gpu_or_skip("fp8 Triton kernels")
    case = make_case(5, [(7, 40), (1, 9), (0, 0), (20, 20)], pad_tokens=3)
    k8, v8 = _fp8(case, *SCALES)
    q = case["q"].astype(dtype)
    args = (case["block_tables"], case["context_lens"], case["query_start_loc"])
    kw = dict(scale=q.shape[-1] ** -0.5, k_scale=SCALES[0], v_scale=SCALES[1])
    ref = ragged_paged_attention_reference(q, k8, v8, *args, **kw)
    _close(ragged_paged_attention(q, k8, v8, *args, interpret=interpret, **kw), ref, rtol)
    _close(cpu_paged_attention(q, k8, v8, *args, **kw), ref, rtol)
    # fp8 against the float cache it came from: within the quantization error.
    full = ragged_paged_attention_reference(q, case["k"], case["v"], *args,
                                            scale=kw["scale"])
    assert _err(ref, full) < 0.1


def _err(out, ref):
    out, ref = (np.asarray(x.astype(jnp.float32)) for x in (out, ref))
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def _close(out, ref, rtol):
    assert not np.isnan(np.asarray(out.astype(jnp.float32))).any()
    assert _err(out, ref) < rtol, f"relative error {_err(out, ref):.3g} >= {rtol}"


def test_lowering_for_h100_with_fp8_cache():
    """Both kernels lower to Triton for an H100 with an fp8 cache and bf16 queries."""
    import test_kernel_lowering as tl

    cache = tl.cache_args
    try:
        tl.cache_args = lambda nb, bs, kvh, d, dtype: cache(nb, bs, kvh, d, FP8)
        for num_seqs in (1, 64):
            tl.lower_decode(num_seqs=num_seqs, group=4, head_dim=128, block_size=16,
                            dtype=jnp.bfloat16, k_scale=0.5, v_scale=2.0)
        tl.lower_ragged(num_tokens=256, num_seqs=16, group=4, head_dim=128, block_size=16,
                        dtype=jnp.bfloat16, k_scale=0.5, v_scale=2.0)
    finally:
        tl.cache_args = cache


def test_kv_budget_holds_twice_the_tokens(llama_dir):
    """From the same byte budget, an fp8 cache gets twice the blocks of a
    bf16 one (pallas backend: the bf16 cache is not widened to f32)."""
    base = dict(dtype="bfloat16", attention_backend="pallas", kv_cache_memory=1 << 20,
                compile_all_buckets=False, **SMALL)
    bf16 = LLM(llama_dir, **base).llm_engine
    fp8 = LLM(llama_dir, kv_cache_dtype="fp8", **base).llm_engine
    assert bf16.runner.kv_caches[0][0].dtype == jnp.bfloat16
    assert fp8.runner.kv_caches[0][0].dtype == FP8
    assert fp8.kv.num_blocks - 1 == 2 * (bf16.kv.num_blocks - 1)


# Measured on the tiny llama (random weights, f32): 222 of 240 greedy tokens
# (92.5%) equal the f32 cache's. Random weights give flat logits, so a
# quantization error flips near-ties and the sequence diverges after it.
AGREEMENT_FLOOR = 0.8


def test_engine_greedy_fp8_against_float_cache(llama_dir):
    prompts = make_prompts()
    ref = run_greedy(LLM(llama_dir, **SMALL), prompts)
    llm = LLM(llama_dir, kv_cache_dtype="fp8_e4m3", **SMALL)
    got = run_greedy(llm, prompts)
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    total = sum(len(r) for r in ref)
    share = same / total
    print(f"fp8 KV greedy agreement: {same}/{total} = {share:.3f}")
    assert share >= AGREEMENT_FLOOR, f"agreement {share:.3f} under {AGREEMENT_FLOOR}"
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_prefix_caching_and_preemption_free_every_block(llama_dir, mode):
    rng = np.random.default_rng(2)
    shared = [int(x) for x in rng.integers(3, 900, 40)]
    prompts = [shared + p for p in make_prompts(seed=3)]
    llm = LLM(llama_dir, kv_cache_dtype="fp8", block_size=16, num_kv_blocks=14,
              preemption_mode=mode, swap_space=0.01, **SMALL)
    if mode == "swap":  # host blocks in the cache's dtype
        assert llm.llm_engine.runner.host_kv[0][0].dtype == FP8
    outs = run_greedy(llm, prompts, max_tokens=16)
    assert all(len(o) == 16 for o in outs)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert_all_blocks_free(llm)


def test_scales_from_checkpoint(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = str(tmp_path / "scaled")
    shutil.copytree(llama_dir, d)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.k_scale"] = np.array(0.125, np.float32)
    tensors["model.layers.1.self_attn.v_scale"] = np.array(0.5, np.float32)
    save_file(tensors, path)
    assert load_kv_scales(d, 2) == ((1.0, 1.0), (0.125, 0.5))
    assert load_kv_scales(str(tmp_path / "model.gguf"), 2) == ((1.0, 1.0),) * 2  # a file
    engine = LLM(d, kv_cache_dtype="fp8", compile_all_buckets=False, **SMALL).llm_engine
    assert engine.runner.cfg.kv_scales == ((1.0, 1.0), (0.125, 0.5))
    tensors["model.layers.0.self_attn.v_scale"] = np.array(-1.0, np.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="v_scale"):
        load_kv_scales(d, 2)


def test_bad_value_names_it(llama_dir):
    with pytest.raises(ValueError, match="'fp8_e5m2'"):
        LLM(llama_dir, kv_cache_dtype="fp8_e5m2", **SMALL)


def test_cli_flag():
    import argparse

    from jpaged.config.engine import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config_from_args(p.parse_args(["--kv-cache-dtype", "fp8"])).kv_cache_dtype \
        == "fp8"
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-cache-dtype", "int8"])


def test_write_kv_stores_quantized_with_layer_scales():
    from jpaged.layers.attention import AttentionMetadata, write_kv

    rng = np.random.default_rng(4)
    k, v = (jnp.asarray(rng.standard_normal((3, 2, 16)), jnp.float32) for _ in range(2))
    cache = jnp.zeros((4, 8, 2, 16), FP8)
    md = AttentionMetadata(slot_mapping=jnp.array([9, 10, 99], jnp.int32), block_tables=None,
                           context_lens=None, query_start_loc=None,
                           kv_scales=((1.0, 1.0), SCALES)).for_layer(1)
    kc, vc = write_kv(cache, cache, k, v, md.slot_mapping, md.kv_scale)
    assert kc.dtype == vc.dtype == FP8
    np.testing.assert_array_equal(np.asarray(kc[1, 1:3], np.float32),
                                  np.asarray(quantize(k[:2], SCALES[0]), np.float32))
    np.testing.assert_array_equal(np.asarray(vc[1, 1:3], np.float32),
                                  np.asarray(quantize(v[:2], SCALES[1]), np.float32))


@pytest.mark.slow
def test_engine_pallas_interpreted_fp8_equals_reference_fp8(llama_dir):
    """The engine's Pallas path (decode and ragged kernels, interpreted) on an
    fp8 cache gives the reference backend's greedy tokens on the same cache."""
    prompts = make_prompts(seed=2, lens=(1, 9, 20))
    cfg = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, block_size=8,
               kv_cache_dtype="fp8")
    pallas = LLM(llama_dir, attention_backend="pallas", **cfg)
    assert pallas.llm_engine.runner.kv_caches[0][0].dtype == FP8
    got = run_greedy(pallas, prompts, max_tokens=6)
    assert got == run_greedy(LLM(llama_dir, attention_backend="reference", **cfg), prompts,
                             max_tokens=6)
    assert_all_blocks_free(pallas)


def test_tensor_parallel_fp8_cache_equals_one_device(mistral_dir):
    """Split by KV heads over 2 and 4 devices (4: one copy of a KV head per
    device), the fp8 cache gives one device's greedy tokens."""
    prompts = make_prompts(seed=7, lens=(1, 20, 7))
    cfg = dict(block_size=8, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
               num_kv_blocks=32, kv_cache_dtype="fp8")
    outs = {tp: run_greedy(LLM(mistral_dir, tensor_parallel_size=tp, **cfg), prompts,
                           max_tokens=8) for tp in (1, 2, 4)}
    assert outs[1] == outs[2] == outs[4]

"""Tensor parallelism on 8 fake CPU devices: greedy tokens at TP 2, 4 and 8
(llama at 4, qwen2 at 2, mistral at 2 and 8) equal TP 1 and transformers
under chunked prefill, preemption (recompute and swap) and prefix caching
(split KV heads, and 2 KV heads copied onto 4 and 8 devices), with both
attention backends; each device holds its share of the weights and the KV
cache; no step compiles after warm-up; impossible splits are refused with
the numbers named."""

import jax
import numpy as np
import pytest
from test_engine import assert_all_blocks_free, hf_greedy, make_prompts

from jpaged import LLM, SamplingParams
from jpaged.config.model import ModelConfig
from jpaged.distributed import check_split

MAX_TOKENS = 12
# Chunked prefill (prompts up to 33 tokens, 16 a step), preemption (10 blocks
# of 8 cannot hold 4 such requests) and prefix caching (a shared 2-block prefix).
PRESSURE = dict(block_size=8, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128,
                num_kv_blocks=10, enable_prefix_caching=True, compile_all_buckets=False)


def pressure_prompts(seed: int) -> list[list[int]]:
    shared = make_prompts(seed=seed + 100, lens=(16,))[0]
    tails = make_prompts(seed=seed, lens=(1, 9, 17, 5))
    return [shared + t for t in tails] + make_prompts(seed=seed + 1, lens=(3, 33))


def run(llm, prompts, max_tokens=MAX_TOKENS):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def param_bytes_per_device(params) -> dict:
    """Bytes of parameter shards on each device."""
    out = {}
    for leaf in jax.tree.leaves(params):
        for sh in leaf.addressable_shards:
            out[sh.device] = out.get(sh.device, 0) + sh.data.nbytes
    return out


@pytest.mark.parametrize("arch,tp,extra", [
    ("llama", 4, {}),  # 4 heads, 2 KV heads: each copied onto 2 devices
    # q/k/v biases split with their heads; swapped KV blocks keep their split
    ("qwen2", 2, dict(preemption_mode="swap", swap_space=0.01)),
    ("mistral", 8, {}),  # 8 heads, 2 KV heads: 4 copies of each
], ids=["llama-4", "qwen2-2-swap", "mistral-8"])
def test_tp_greedy_equals_hf_under_pressure(request, arch, tp, extra):
    model_dir = request.getfixturevalue(f"{arch}_dir")
    prompts = pressure_prompts(seed=tp)
    llm = LLM(model_dir, tensor_parallel_size=tp, **{**PRESSURE, **extra})
    runner = llm.llm_engine.runner
    assert runner.mesh.size == tp
    assert run(llm, prompts) == hf_greedy(model_dir, prompts, MAX_TOKENS)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0, "the KV budget was meant to force preemption"
    assert stats.prefix_cache_hits > 0, "the shared prefix was meant to hit the cache"
    assert_all_blocks_free(llm)

    # Each device holds 1/tp of the weights, plus the replicated norms (and,
    # with fewer KV heads than devices, the whole k/v projections).
    mc = llm.llm_engine.model_config
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(runner.params))
    flat = jax.tree_util.tree_flatten_with_path(runner.params)[0]
    norms = sum(x.nbytes for p, x in flat if "norm" in jax.tree_util.keystr(p))
    kv_proj = sum(x.nbytes for p, x in flat if any(
        k in jax.tree_util.keystr(p) for k in ("k_proj", "v_proj")))
    allowance = norms + (kv_proj if mc.num_key_value_heads < tp else 0)
    per_dev = param_bytes_per_device(runner.params)
    assert len(per_dev) == tp
    assert max(per_dev.values()) <= total / tp + allowance
    assert max(per_dev.values()) < total  # no device holds the whole model
    # KV cache: each device holds one tp-th of the KV heads (at least one).
    k0 = runner.kv_caches[0][0]
    heads_per_dev = max(mc.num_key_value_heads // tp, 1)
    assert {s.data.shape[2] for s in k0.addressable_shards} == {heads_per_dev}


def test_tp_tokens_equal_tp1_and_no_recompile_after_warmup(mistral_dir):
    """Warm-up compiles every bucket; a TP 2 run then compiles nothing more
    and gives TP 1's tokens, logprobs (to float rounding) included."""
    prompts = make_prompts(seed=7, lens=(1, 20, 7))
    cfg = dict(block_size=8, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
               num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    outs = {}
    for tp in (1, 2):
        llm = LLM(mistral_dir, tensor_parallel_size=tp, **cfg)
        warm = llm.llm_engine.runner.num_compiles
        assert warm == 3  # buckets of 1 (the reference backend), 8 and 16 tokens
        outs[tp] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.llm_engine.runner.num_compiles == warm
        assert_all_blocks_free(llm)
    for a, b in zip(outs[1], outs[2]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        lp1 = [d[t].logprob for d, t in zip(a.outputs[0].logprobs, a.outputs[0].token_ids)]
        lp2 = [d[t].logprob for d, t in zip(b.outputs[0].logprobs, b.outputs[0].token_ids)]
        np.testing.assert_allclose(lp1, lp2, atol=1e-4)


def test_tp_pallas_kernels_under_shard_map(llama_dir):
    """The Pallas kernels (interpreted on CPU) run per device under shard_map,
    decode and ragged, with each of 2 KV heads copied onto 2 of 4 devices."""
    prompts = make_prompts(seed=3, lens=(3, 12))
    cfg = dict(block_size=8, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=32,
               num_kv_blocks=8, compile_all_buckets=False)
    llm = LLM(llama_dir, tensor_parallel_size=4, attention_backend="pallas", **cfg)
    assert llm.llm_engine.runner.cfg.backend == "pallas"
    assert run(llm, prompts, max_tokens=4) == hf_greedy(llama_dir, prompts, 4)
    assert llm.llm_engine.runner.num_compiles == 2  # mixed and decode-only
    assert_all_blocks_free(llm)


def test_bad_tensor_parallel_sizes_name_the_numbers(llama_dir):
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"tensor_parallel_size={2 * n} needs {2 * n} devices "
                                         f"but only {n}"):
        LLM(llama_dir, tensor_parallel_size=2 * n)
    with pytest.raises(ValueError, match="positive integer"):
        LLM(llama_dir, tensor_parallel_size=0)
    # The tiny llama has 4 attention heads.
    with pytest.raises(ValueError, match="tensor_parallel_size=8 does not divide "
                                         "num_attention_heads=4"):
        LLM(llama_dir, tensor_parallel_size=8)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide "
                                         "num_attention_heads=4"):
        LLM(llama_dir, tensor_parallel_size=3)
    cfg = ModelConfig.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 and num_key_value_heads=6"):
        check_split(cfg.replace(num_attention_heads=12, num_key_value_heads=6), 4)
    with pytest.raises(ValueError, match="does not divide intermediate_size=102"):
        check_split(cfg.replace(intermediate_size=102), 4)
    with pytest.raises(ValueError, match="does not divide vocab_size=1001"):
        check_split(cfg.replace(vocab_size=1001), 2)
    with pytest.raises(ValueError, match="load_format='orbax'"):
        LLM(llama_dir, tensor_parallel_size=2, load_format="orbax")


def test_quantized_weights_under_tp_are_refused_by_name(tmp_path, llama_dir):
    """Quantized weights are not split across devices: TP > 1 with on-the-fly
    quantization, a pre-quantized checkpoint or a GGUF file is refused naming
    both settings; quantization='none' dequantizes and splits as usual."""
    from flax import nnx
    from gguf import GGMLQuantizationType as T
    from jax.sharding import PartitionSpec
    from test_gguf import _write_gguf
    from test_quant import _quantized_checkpoint

    from jpaged.distributed import make_mesh
    from jpaged.layers.linear import is_quantized
    from jpaged.model_loader import load_model

    with pytest.raises(ValueError, match="quantization='int8' with tensor_parallel_size=2"):
        LLM(llama_dir, tensor_parallel_size=2, quantization="int8")
    gptq = str(tmp_path / "gptq")
    _quantized_checkpoint(llama_dir, gptq, "gptq_v1")
    with pytest.raises(ValueError, match="quantization='gptq' with tensor_parallel_size=2"):
        LLM(gptq, tensor_parallel_size=2)
    path = str(tmp_path / "tiny.gguf")
    _write_gguf(path, dict(embd=T.Q8_0, out=T.F16, q=T.Q4_0, k=T.Q4_0, v=T.Q4_0, o=T.Q4_1,
                           ffn=T.Q4_0, down=T.Q8_0))
    with pytest.raises(ValueError, match="GGUF file.*tensor_parallel_size=2"):
        LLM(path, tensor_parallel_size=2)
    with jax.set_mesh(make_mesh(2)):
        _, _, params = load_model(gptq, load_format="safetensors", quantization="none")
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    q = flat["model.layers.0.self_attn.q_proj.weight"]
    assert not is_quantized(q) and q.sharding.spec == PartitionSpec("model", None)
    assert q.addressable_shards[0].data.shape[0] == q.shape[0] // 2

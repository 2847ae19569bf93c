"""Tiny offline Hugging Face checkpoints: the demo model and the test oracle's.

`make_tiny_model` writes a complete Hugging Face model directory with no
network and no PyTorch: ``config.json`` and ``generation_config.json``,
seeded random weights in safetensors (one file or sharded with an index), a
byte-level BPE tokenizer trained with `tokenizers` on a built-in corpus, and
a chat template. Any of the supported architectures and any sizes. A small
random-weight demo model (for tests and quick smoke runs; the default model is
SmolLM2, see `jpaged.model_loader.default_model`) is built the same way and
cached under the user's cache directory (`demo_model_path`).
"""

from __future__ import annotations

import json
import os

import numpy as np

ARCHS = {"llama": ("LlamaForCausalLM", "llama"),
         "mistral": ("MistralForCausalLM", "mistral"),
         "qwen2": ("Qwen2ForCausalLM", "qwen2")}

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# A small multilingual corpus: enough for a BPE vocabulary of a few thousand.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. Paged attention stores the key
and value cache in fixed-size blocks, like pages of virtual memory, so that a
serving engine can pack many requests into one batch without wasting memory.
Once upon a time there was a little robot who liked to count numbers: one,
two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
for i in range(10): print(i * i, end=", ")
The capital of France is Paris. The capital of Japan is Tokyo. The capital of
Italy is Rome. Water boils at 100 degrees Celsius at sea level.
Café, naïve, façade, résumé, jalapeño, Straße, smörgåsbord, crème brûlée.
Привет, как дела? Добрый день! Спасибо большое.
你好，世界！今天天气很好。我们一起去公园散步吧。
こんにちは、世界。日本語のテキストも少し入れておきます。
안녕하세요. 반갑습니다.  مرحبا بالعالم  שלום עולם  नमस्ते दुनिया
Emoji too: 🙂 🚀 🎉 ✨ 👍🏽 and symbols like € £ ¥ © ® ™ ± × ÷ ∞ ≈ ≠ ≤ ≥.
User: What is the meaning of life? Assistant: Forty-two, according to a book.
JSON: {"name": "jpaged", "version": 1, "tags": ["jax", "pallas", "llm"]}
"""


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = _CORPUS.splitlines()
    # Repeat with variations so merges have counts to work with.
    corpus = [f"{a} {b}" for a in lines for b in lines[::3]] + lines * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def _weights(cfg: dict, dtype: str, seed: int, init_std: float) -> dict[str, np.ndarray]:
    """Random weights with Hugging Face names and shapes, ``[out, in]``."""
    import ml_dtypes

    np_dtype = {"float32": np.float32, "float16": np.float16,
                "bfloat16": ml_dtypes.bfloat16}[dtype]
    rng = np.random.default_rng(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    bias = cfg["model_type"] == "qwen2"
    out: dict[str, np.ndarray] = {}

    def w(name, *shape, std=init_std):
        out[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np_dtype)

    w("model.embed_tokens.weight", v, h, std=1.0)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w(p + "self_attn.q_proj.weight", nh * d, h)
        w(p + "self_attn.k_proj.weight", nkv * d, h)
        w(p + "self_attn.v_proj.weight", nkv * d, h)
        w(p + "self_attn.o_proj.weight", h, nh * d)
        if bias:
            w(p + "self_attn.q_proj.bias", nh * d)
            w(p + "self_attn.k_proj.bias", nkv * d)
            w(p + "self_attn.v_proj.bias", nkv * d)
        w(p + "mlp.gate_proj.weight", i, h)
        w(p + "mlp.up_proj.weight", i, h)
        w(p + "mlp.down_proj.weight", h, i)
        w(p + "input_layernorm.weight", h, std=0.1)
        out[p + "input_layernorm.weight"] += np_dtype(1.0)
        w(p + "post_attention_layernorm.weight", h, std=0.1)
        out[p + "post_attention_layernorm.weight"] += np_dtype(1.0)
    out["model.norm.weight"] = np.ones((h,), np_dtype)
    if not cfg["tie_word_embeddings"]:
        w("lm_head.weight", v, h)
    return out


def _save_safetensors(tensors: dict[str, np.ndarray], path: str, num_shards: int) -> None:
    from safetensors.numpy import save_file

    if num_shards <= 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map, total = {}, 0
    for k in range(num_shards):
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::num_shards]}
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        total += sum(a.nbytes for a in part.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_tiny_model(
    path: str,
    arch: str = "llama",
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 2048,
    sliding_window: int | None = None,
    dtype: str = "float32",
    num_shards: int = 1,
    seed: int = 0,
    init_std: float = 0.05,
    write_weights: bool = True,
) -> str:
    """Write a random-weight Hugging Face checkpoint to ``path`` and return it.

    ``write_weights=False`` writes only config and tokenizer, for
    ``load_format="dummy"`` runs of large shapes."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not supported; choose one of {', '.join(ARCHS)}")
    from transformers import PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    tok = _train_tokenizer(vocab_size)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    hf_tok.save_pretrained(path)
    architecture, model_type = ARCHS[arch]
    eos_id = tok.token_to_id(EOS)
    cfg = {
        "architectures": [architecture], "model_type": model_type,
        # The embedding may be larger than the tokenizer, as in many real models.
        "vocab_size": max(vocab_size, tok.get_vocab_size()), "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim or hidden_size // num_attention_heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": rope_theta,
        "rope_scaling": rope_scaling, "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": dtype,
        "bos_token_id": tok.token_to_id(BOS), "eos_token_id": eos_id,
        "pad_token_id": tok.token_to_id(PAD), "attention_bias": False,
        "sliding_window": sliding_window, "use_cache": True,
    }
    if rope_scaling is None:
        del cfg["rope_scaling"]
    if model_type == "qwen2":
        cfg["use_sliding_window"] = sliding_window is not None
        cfg["max_window_layers"] = num_hidden_layers
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos_id,
                   "pad_token_id": cfg["pad_token_id"]}, f, indent=2)
    if write_weights:
        _save_safetensors(_weights(cfg, dtype, seed, init_std), path, num_shards)
    return path


DEMO_MODEL_KWARGS = dict(arch="llama", vocab_size=2048, hidden_size=128,
                         intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, seed=0)


def demo_model_path() -> str:
    """The built-in demo model, created under the user's cache dir on first use."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "jpaged", "demo-llama-v1")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        tmp = path + f".tmp{os.getpid()}"
        make_tiny_model(tmp, **DEMO_MODEL_KWARGS)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.isdir(path):
            os.replace(tmp, path)
    return path

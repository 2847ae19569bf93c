"""GGUF files (llama.cpp) for the ``llama`` architecture, read with `gguf`.

* The config comes from the ``llama.*`` metadata keys (`hf_config`); the
  tokenizer and chat template from ``tokenizer.*`` (see `jpaged.tokenizer`).
* Tensor names map to Hugging Face names (`HF_NAMES`); a file without
  ``output.weight`` ties the LM head to the embedding.
* F32/F16/BF16 tensors load as arrays. Q8_0, Q4_0, Q4_1 (and, wider than in
  the file, the K-quants Q4_K and Q6_K, see `_k_quant`) stay quantized:
  each block of 32 inputs (a float16 scale ``d``; Q4_1 also a float16 minimum
  ``m``; then 32 int8 values, or 16 bytes whose low nibbles are elements 0-15
  and high nibbles 16-31) is repacked losslessly into a `QuantizedWeight` with
  group size 32: Q8_0 ``d * q``, Q4_0 ``d * (q - 8)``, Q4_1 ``d * q + m``.
* llama.cpp's converter interleaves the rows of ``attn_q``/``attn_k`` per
  head (the two rotary halves alternate); `_unpermute_rows` undoes it, as
  transformers' GGUF loader does, on whole rows, so quantized blocks survive.

Any other tensor type or architecture fails with an error naming it.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from jpaged.model_loader.weights import from_unpacked

SUPPORTED_ARCHITECTURES = ("llama",)
HF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
            "output": "lm_head"}
BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}


def open_gguf(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"model={path!r} is not a file")
    from gguf import GGUFReader

    return GGUFReader(path)


def metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_config(reader, where: str = "") -> dict:
    """A Hugging Face style ``config.json`` dict from the GGUF metadata."""
    arch = metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} in {where!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{where!r} has a rope_freqs tensor (Llama 3.1 rope scaling), "
                         "which jpaged does not read from GGUF yet")
    m = lambda key, default=None: metadata(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = int(m("attention.head_count"))
    hidden = int(m("embedding_length"))
    vocab = m("vocab_size") or len(metadata(reader, "tokenizer.ggml.tokens", []))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(m("feed_forward_length")),
        "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m("attention.head_count_kv", heads)),
        "head_dim": int(m("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(m("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(m("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = m("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"GGUF rope scaling {scaling!r} in {where!r} is not supported; "
                             "supported: 'linear'")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(m("rope.scaling.factor"))}
    return cfg


def _float_blocks(b: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., start:start + 2]).view(np.float16)[..., 0]


def dequantize_tensor(t):
    """A GGUF tensor -> a float array, or a `QuantizedWeight` for Q8_0/Q4_0/Q4_1."""
    from gguf import GGMLQuantizationType as T

    kind = T(t.tensor_type)
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # [out, in]
    if kind in (T.F32, T.F16):
        return np.asarray(t.data).reshape(shape)
    if kind == T.BF16:
        return np.asarray(t.data).view(ml_dtypes.bfloat16).reshape(shape)
    if kind not in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K) or len(shape) != 2:
        raise ValueError(f"GGUF tensor {t.name!r} has type {kind.name} (shape {shape}); "
                         "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K")
    out, n = shape
    if kind in (T.Q4_K, T.Q6_K):
        return _k_quant(np.asarray(t.data).reshape(out, n // 256, -1), kind == T.Q4_K, t.name)
    block_bytes = {T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20}[kind]
    b = np.asarray(t.data).reshape(out, n // 32, block_bytes)
    d = _float_blocks(b, 0)  # [out, n / 32]
    if kind == T.Q8_0:
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(out, n)
        return from_unpacked(q, d, bits=8, where=t.name)
    qs = b[..., 4:] if kind == T.Q4_1 else b[..., 2:]  # [out, n / 32, 16]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(out, n)
    if kind == T.Q4_0:
        return from_unpacked(q, d, bits=4, where=t.name)  # signed: nibble - 8
    return from_unpacked(q, d, bits=4, min=_float_blocks(b, 2), where=t.name)


def _k_quant(b: np.ndarray, q4: bool, name: str):
    """Q4_K / Q6_K super-blocks of 256 -> a `QuantizedWeight` with float32
    sub-block scales (``d * sc``, exact: 11 x 8 significant bits), so it is
    lossless but wider than the file (Q4_K 6 bits a weight, Q6_K 10).

    Q4_K (144 bytes): f16 ``d``, f16 ``dmin``, 12 bytes of 6-bit scales and
    mins for 8 sub-blocks of 32, then 128 bytes: byte ``i`` of chunk ``c``
    (32 bytes) holds element ``i`` of sub-block ``2c`` (low nibble) and of
    ``2c + 1`` (high); ``w = d * sc * q - dmin * m``.
    Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16
    int8 scales (sub-blocks of 16), f16 ``d``; ``w = d * sc * (q - 32)``.
    """
    out, nsb, _ = b.shape
    if q4:
        d, dmin = _float_blocks(b, 0).astype(np.float32), _float_blocks(b, 2).astype(np.float32)
        raw = b[..., 4:16].reshape(out, nsb, 3, 4)
        lo, hi, mix = raw[..., 0, :], raw[..., 1, :], raw[..., 2, :]
        sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
        mn = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], axis=-1)
        qs = b[..., 16:].reshape(out, nsb, 4, 32)
        q = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(out, nsb * 256)
        scale = (d[..., None] * sc.astype(np.float32)).reshape(out, -1)
        minimum = -(dmin[..., None] * mn.astype(np.float32)).reshape(out, -1)
        return from_unpacked(q, scale, bits=4, min=minimum, where=name)
    ql = b[..., :128].reshape(out, nsb, 2, 64)
    qh = b[..., 128:192].reshape(out, nsb, 2, 32)
    low = np.stack([ql & 0xF, ql >> 4], axis=3).reshape(out, nsb, 2, 4, 32)
    high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=3)  # [out, nsb, 2, 4, 32]
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(out, nsb * 256)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)  # [out, nsb, 16]
    d = np.ascontiguousarray(b[..., 208:210]).view(np.float16).astype(np.float32)  # [.., 1]
    return from_unpacked(q, (d * sc).reshape(out, -1), bits=8, where=name)


def _unpermute_rows(w, n_head: int):
    """Undo the converter's per-head row interleave of attn_q/attn_k."""
    rows = w.shape[0]
    idx = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)
    # the converter wrote row idx[r] of the HF tensor at row r
    inv = np.argsort(idx)
    if isinstance(w, np.ndarray):
        return w[inv]
    import dataclasses

    take = lambda a: None if a is None else a[inv]  # noqa: E731
    return dataclasses.replace(w, qvalue=take(w.qvalue), scale=take(w.scale),
                               zero=take(w.zero), min=take(w.min))


def tensor_source(reader, cfg):
    """Hugging Face tensor name -> host array / QuantizedWeight (None if absent)."""
    by_name = {t.name: t for t in reader.tensors}
    hf = {}
    for name in by_name:
        base, _, kind = name.rpartition(".")
        if base.startswith("blk."):
            _, layer, part = base.split(".", 2)
            if part in BLOCK_NAMES:
                hf[f"model.layers.{layer}.{BLOCK_NAMES[part]}.{kind}"] = name
        elif base in HF_NAMES:
            hf[f"{HF_NAMES[base]}.{kind}"] = name

    def source(hf_name: str):
        if hf_name not in hf:
            return None
        name = hf[hf_name]
        w = dequantize_tensor(by_name[name])
        if ".attn_q." in name:
            w = _unpermute_rows(w, cfg.num_attention_heads)
        elif ".attn_k." in name:
            w = _unpermute_rows(w, cfg.num_key_value_heads)
        return w

    return source

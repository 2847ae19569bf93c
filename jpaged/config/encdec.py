"""Encoder-decoder checkpoints (BART, mBART) read into a `ModelConfig`.

The engine sizes its KV cache, block tables and token budget from the
decoder-only fields of `ModelConfig`, so a BART config maps onto them as the
engine sees one request: ``num_hidden_layers`` and the head counts are the
decoder's (one paged KV cache per decoder layer holds both its
self-attention K/V and, in the request's first blocks, its cross-attention
K/V of the encoder output), and ``max_position_embeddings`` is twice the
checkpoint's, since one engine sequence is the encoder prompt (padded to a
block boundary) followed by the decoder's tokens. Everything only the Flax
model needs is kept, hashable, in `EncDecConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

ENCDEC_ARCHITECTURES = ("BartForConditionalGeneration", "MBartForConditionalGeneration")
ACTIVATIONS = ("gelu", "relu", "gelu_new", "silu", "swish", "tanh")


@dataclass(frozen=True)
class EncDecConfig:
    """The encoder-decoder part of a `ModelConfig` (frozen, hashable)."""

    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_positions: int  # each of the encoder and decoder position tables
    activation: str
    scale_embedding: bool
    pre_layernorm: bool  # mBART: norm before each block and a final norm; BART: after
    decoder_start_token_id: int
    forced_bos_token_id: int | None
    pad_token_id: int
    layer_norm_eps: float = 1e-5


def encdec_fields(hf: dict, arch: str) -> dict:
    """`ModelConfig` keyword arguments for a BART or mBART ``config.json``."""
    act = hf.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"activation_function={act!r} is not supported for {arch}; "
                         f"supported: {', '.join(ACTIVATIONS)}")
    d_model = int(hf["d_model"])
    heads = int(hf["decoder_attention_heads"])
    if d_model % heads or d_model % int(hf["encoder_attention_heads"]):
        raise ValueError(f"d_model={d_model} is not a multiple of the attention heads")
    max_pos = int(hf.get("max_position_embeddings", 1024))
    eos = hf.get("eos_token_id")
    start = hf.get("decoder_start_token_id")
    if start is None:
        start = eos if eos is not None else 2
    forced = hf.get("forced_bos_token_id")
    return dict(
        vocab_size=int(hf["vocab_size"]), hidden_size=d_model,
        intermediate_size=int(hf["decoder_ffn_dim"]),
        num_hidden_layers=int(hf["decoder_layers"]), num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=d_model // heads, rms_norm_eps=1e-5,
        rope_theta=0.0, rope_scaling=None, max_position_embeddings=2 * max_pos,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=True, mlp_bias=True, sliding_window=None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=(eos,) if isinstance(eos, int) else tuple(eos or ()),
        encoder_decoder=EncDecConfig(
            encoder_layers=int(hf["encoder_layers"]),
            encoder_attention_heads=int(hf["encoder_attention_heads"]),
            encoder_ffn_dim=int(hf["encoder_ffn_dim"]),
            decoder_ffn_dim=int(hf["decoder_ffn_dim"]), max_positions=max_pos,
            activation=act, scale_embedding=bool(hf.get("scale_embedding", False)),
            pre_layernorm=arch == "MBartForConditionalGeneration",
            decoder_start_token_id=int(start),
            forced_bos_token_id=None if forced is None else int(forced),
            pad_token_id=int(hf.get("pad_token_id", 1))))

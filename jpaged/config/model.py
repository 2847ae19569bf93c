"""Model configuration read from a Hugging Face ``config.json``.

`ModelConfig` is frozen and hashable so jitted functions can take it as a
static argument. `ModelConfig.from_hf_dict` is the single place where the
checkpoint's options are checked: anything jpaged cannot compute exactly
(an unknown architecture, activation or rope type) fails here, at load, with
a message that names it and lists what is supported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import jax.numpy as jnp

from jpaged.config.encdec import ENCDEC_ARCHITECTURES, EncDecConfig, encdec_fields

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           *ENCDEC_ARCHITECTURES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                  "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: str | None, config_dtype: str | None) -> str:
    """Map a user dtype ("auto", "bfloat16", "fp16", ...) to a canonical name."""
    name = (dtype or "auto").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name == "auto":
        name = _DTYPE_ALIASES.get((config_dtype or "float32").lower(),
                                  (config_dtype or "float32").lower())
        if name not in DTYPES:  # e.g. float64 checkpoints run in float32
            name = "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of "
                         f"'auto', {', '.join(repr(d) for d in DTYPES)}")
    return name


@dataclass(frozen=True)
class ModelConfig:
    """What the Flax models need to know about a checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # Hashable form of the rope scaling dict: (("factor", 8.0), ...) or None.
    rope_scaling: tuple | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str  # canonical compute/param dtype name, see DTYPES
    # BART/mBART: the encoder and what only the model needs (jpaged.config.encdec).
    encoder_decoder: EncDecConfig | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.encoder_decoder is not None

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: str | None = "auto") -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"model={model_dir!r} has no config.json; pass a local "
                             "Hugging Face model directory")
        with open(path) as f:
            hf = json.load(f)
        return cls.from_hf_dict(hf, dtype=dtype)

    @classmethod
    def from_hf_dict(cls, hf: dict, dtype: str | None = "auto") -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"architectures={archs!r} is not supported; jpaged supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if arch in ENCDEC_ARCHITECTURES:
            return cls(architecture=arch, **encdec_fields(hf, arch), dtype=resolve_dtype(
                dtype, hf.get("torch_dtype") or hf.get("dtype")))
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported for {arch}; "
                             "supported: 'silu'")
        # transformers >= 5 writes rope_parameters; older configs rope_theta
        # plus an optional rope_scaling dict.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if not rope and scaling:
            rope = dict(scaling)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        rope_scaling = None
        if rope_type != "default":
            rope["rope_type"] = rope_type
            rope.pop("type", None)
            rope_scaling = tuple(sorted(rope.items()))
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        num_kv = int(hf.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of "
                             f"num_key_value_heads={num_kv}")
        sliding = hf.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
            sliding = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama and Mistral say so in the config.
            attention_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=resolve_dtype(dtype, hf.get("torch_dtype") or hf.get("dtype")),
        )

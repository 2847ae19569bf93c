"""The Llama family in Flax NNX: Llama 2/3/3.1, Mistral and Qwen2/2.5.

The three architectures share one decoder; the differences are config
switches (Qwen2's q/k/v biases, Mistral's sliding window, Llama-3.1's rope
scaling, tied embeddings, an explicit ``head_dim``). Parameter names and
shapes mirror the Hugging Face checkpoint (``weight`` is ``[out, in]``), so
the loader maps a parameter path to a safetensors name by joining with dots,
except for two fused projections (`FUSED`): ``qkv_proj`` stacks q/k/v and
``gate_up_proj`` stacks gate/up along the output dimension, so a step runs
two matmuls where it would run five (measured on XLA:CPU, 8 layers of the
30M model: 6.1 ms against 7.5 ms at 8 tokens, 19.5 against 20.8 at 128).
Under tensor parallelism (a mesh in context while the model is built) the
projections stay separate, each split by heads or MLP columns, and every
parameter carries its logical axis names for `jpaged.distributed.sharding`.

The forward pass runs a flat batch of ``T`` tokens from any number of
sequences: attention inputs (positions, the per-layer KV cache, and the
`AttentionMetadata`) are explicit arguments, and the updated cache is
returned, never stored on the module.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged import cpu_kernels
from jpaged.config.model import ModelConfig
from jpaged.distributed.sharding import AXES_KEY, kv_heads_axis, tp_size
from jpaged.layers.attention import (AttentionMetadata, RowSelection, attend_cached,
                                    paged_attention, write_step_kv)
from jpaged.layers.linear import dense, embed, is_quantized

KVCache = list  # [(k_cache, v_cache)] per layer, see jpaged.layers.attention

# Fused parameter -> the checkpoint tensors it stacks along the output dim.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def checkpoint_names(param: str) -> list[str]:
    """Hugging Face tensor names that make up one parameter (in stacking order)."""
    for fused, parts in FUSED.items():
        key = f".{fused}."
        if key in param:
            prefix, suffix = param.split(key)
            return [f"{prefix}.{part}.{suffix}" for part in parts]
    return [param]


# Decoder projections: what on-the-fly quantization (int8/int4/fp8) quantizes.
# Embeddings, norms and the LM head stay in the float dtype.
LINEAR_WEIGHTS = ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                  "mlp.gate_up_proj.weight", "mlp.down_proj.weight")


def is_linear_weight(param: str) -> bool:
    return param.startswith("model.layers.") and param.endswith(LINEAR_WEIGHTS)


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * std


class Linear(nnx.Module):
    """``y = x @ weight.T + bias`` with the checkpoint's ``[out, in]`` layout; the
    weight may be a plain array or a `QuantizedWeight` (see `jpaged.layers.linear`).
    ``axes`` are the logical names of ``[out, in]`` (see jpaged.distributed)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, dtype, rngs: nnx.Rngs,
                 axes=(None, None)):
        self.weight = nnx.Param(_init(rngs, (d_out, d_in), dtype), **{AXES_KEY: axes})
        self.bias = (nnx.Param(jnp.zeros((d_out,), dtype), **{AXES_KEY: axes[:1]})
                     if bias else None)

    def __call__(self, x):  # [T, in] -> [T, out]
        return dense(x, self.weight.get_value(),
                     self.bias[...] if self.bias is not None else None)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 and cast back before the weight, as in HF."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):  # [T, dim]
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        x = (x32 * jax.lax.rsqrt(var + self.eps)).astype(dtype)
        return self.weight[...] * x


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with rope scaling."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv = inv.astype(np.float32)
    sc = cfg.rope_scaling_dict
    if sc is None:
        return inv
    if sc["rope_type"] == "linear":
        return (inv / np.float32(sc["factor"])).astype(np.float32)
    # "llama3": leave high frequencies, divide low ones by `factor`, blend between.
    factor = sc["factor"]
    low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old_len = sc.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions, inv_freq):
    """RoPE's cos and sin ``[T, head_dim]`` (float32) for positions ``[T]``,
    computed once a step for every layer's q and k. They come out of a
    `lax.cond` because XLA would otherwise fuse them into each rotation and
    recompute them for every head of every layer (5 ms of a 164 ms 512-token
    CPU step); no fusion crosses a conditional."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]

    def tables(freqs):
        emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, D]
        return jnp.cos(emb), jnp.sin(emb)

    return jax.lax.cond(positions[0] > -(1 << 30), tables, tables, freqs)  # always true


def apply_rope(x, rope):
    """Rotate-half RoPE. x: [T, heads, head_dim]; rope: `rope_tables`."""
    cos = rope[0].astype(x.dtype)[:, None, :]
    sin = rope[1].astype(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, d, dt = cfg.hidden_size, cfg.head_dim, cfg.jnp_dtype
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, d)
        b, nq, nkv = cfg.attention_bias, self.num_heads * d, self.num_kv_heads * d
        # Under tensor parallelism q, k and v are separate, each split by heads:
        # a column split of the fused weight would cut across q/k/v.
        self.fused = tp_size() == 1
        if self.fused:
            self.qkv_proj = Linear(h, nq + 2 * nkv, b, dt, rngs)
        else:
            kv = (kv_heads_axis(self.num_kv_heads), "embed")
            self.q_proj = Linear(h, nq, b, dt, rngs, axes=("heads", "embed"))
            self.k_proj = Linear(h, nkv, b, dt, rngs, axes=kv)
            self.v_proj = Linear(h, nkv, b, dt, rngs, axes=kv)
        self.o_proj = Linear(nq, h, False, dt, rngs, axes=("embed", "heads"))
        self.scale = d ** -0.5
        self.sliding_window = cfg.sliding_window

    def project(self, x, rope):
        """q ``[T, H, D]``, k and v ``[T, KVH, D]``, RoPE applied."""
        t = x.shape[0]
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.fused:
            qkv = self.qkv_proj(x)  # [T, (H + 2 * KVH) * D]
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def __call__(self, x, rope, kv_cache, md: AttentionMetadata):
        q, k, v = self.project(x, rope)
        out, kv_cache = paged_attention(q, k, v, kv_cache, md, scale=self.scale,
                                        sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(x.shape[0], -1)), kv_cache

    def attend(self, q, kv_cache, md: AttentionMetadata):
        """o_proj of ``q``'s attention to the cache as it is (no K/V write)."""
        out = attend_cached(q, kv_cache, md, scale=self.scale,
                            sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(q.shape[0], -1))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, i, b, dt = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.jnp_dtype
        self.fused = tp_size() == 1  # as in Attention: gate and up split apart under TP
        if self.fused:
            self.gate_up_proj = Linear(h, 2 * i, b, dt, rngs)
        else:
            self.gate_proj = Linear(h, i, b, dt, rngs, axes=("mlp", "embed"))
            self.up_proj = Linear(h, i, b, dt, rngs, axes=("mlp", "embed"))
        self.down_proj = Linear(i, h, b, dt, rngs, axes=("embed", "mlp"))
        self.intermediate_size = i

    def __call__(self, x):
        if not self.fused:
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up_w, down_w = self.gate_up_proj.weight.get_value(), self.down_proj.weight.get_value()
        if (self.gate_up_proj.bias is None and self.down_proj.bias is None
                and not is_quantized(gate_up_w) and not is_quantized(down_w)
                and cpu_kernels.native_mlp_applies(x, gate_up_w, down_w)):
            return cpu_kernels.mlp(x, gate_up_w, down_w)  # one native kernel on a CPU
        gate_up = self.gate_up_proj(x)  # [T, 2 * I]
        i = self.intermediate_size
        return self.down_proj(jax.nn.silu(gate_up[:, :i]) * gate_up[:, i:])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                cfg.jnp_dtype)

    def __call__(self, x, rope, kv_cache, md, select: RowSelection | None = None):
        if select is not None:
            return self._selected(x, rope, kv_cache, md, select)
        h, kv_cache = self.self_attn(self.input_layernorm(x), rope, kv_cache, md)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv_cache

    def _selected(self, x, rope, kv_cache, md, select: RowSelection):
        """Every token's K/V into the cache, then the rest of the layer on the
        selected rows only ([S, hidden])."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), rope)
        kv_cache = write_step_kv(k, v, kv_cache, md)

        def rest(q, x, md):
            x = x + self.self_attn.attend(q, kv_cache, md)
            return x + self.mlp(self.post_attention_layernorm(x))

        return select.run(rest, q[select.rows], x[select.rows]), kv_cache


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_init(rngs, (vocab, dim), dtype), **{AXES_KEY: ("vocab", "embed")})
        self.dtype = dtype

    def __call__(self, ids):  # [T] -> [T, dim]
        return embed(self.weight.get_value(), ids, self.dtype)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.jnp_dtype, rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)


class LlamaForCausalLM(nnx.Module):
    """Decoder-only LM; also serves MistralForCausalLM and Qwen2ForCausalLM."""

    supports_row_selection = True  # __call__ takes select= (`RowSelection`)

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.model = LlamaModel(cfg, rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, False, cfg.jnp_dtype, rngs,
                               axes=("vocab", "embed")))

    def __call__(
        self,
        input_ids: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32
        kv_caches: KVCache,
        md: AttentionMetadata,
        select: RowSelection | None = None,
    ) -> tuple[jax.Array, KVCache]:  # ([T, hidden] or [S, hidden] selected, kv_caches)
        x = self.model.embed_tokens(input_ids)
        inv_freq = jnp.asarray(rope_inv_freq(self.config))  # a trace-time constant
        rope = rope_tables(positions, inv_freq)
        new_caches = []
        last = len(self.model.layers) - 1
        for i, (layer, kv) in enumerate(zip(self.model.layers, kv_caches)):
            sel = None
            if select is not None and i == last:
                sel = dataclasses.replace(select, md=select.md.for_layer(i))
            x, kv = layer(x, rope, kv, md.for_layer(i), sel)
            new_caches.append(kv)
        return self.model.norm(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:  # [N, hidden] -> [N, V] f32
        w = (self.model.embed_tokens.weight if self.lm_head is None
             else self.lm_head.weight).get_value()
        return dense(hidden, w).astype(jnp.float32)

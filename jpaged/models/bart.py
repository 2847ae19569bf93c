"""BART and mBART (``BartForConditionalGeneration``, ``MBartForConditionalGeneration``)
in Flax NNX, run by the paged engine.

One engine sequence is the encoder prompt, padded up to a block boundary,
then the decoder's tokens; ``encoder_lens`` gives each scheduled sequence's
encoder length E (the scheduler hands a request's whole encoder to one
step). In a step:

* tokens at positions ``< E`` are encoder tokens. When the step has any, the
  encoder runs over them (bidirectional attention within each sequence, a
  dense mask over the step's tokens) and every decoder layer's
  cross-attention K/V of the encoder output is written once into the
  request's first blocks (its *encoder blocks*), at those tokens' slots.
  Beams fork by sharing block-table rows, so they share these blocks by ref
  count. A step without encoder tokens skips the encoder (`lax.cond`).
* tokens at positions ``>= Epad`` (E rounded up to the block size) are
  decoder tokens at decoder position ``pos - Epad``: self-attention is paged
  over the blocks after the encoder blocks (the block table shifted by the
  sequence's encoder blocks), cross-attention reads the encoder blocks with
  every decoder token as its own one-query sequence (so no causal mask
  applies to it).

Both K/V kinds live in the same per-layer cache (different blocks), so the
engine's allocator, copy-on-write, swap and preemption need no change.
Parameter names mirror the Hugging Face checkpoints: learned positions with
their offset of 2, ``layernorm_embedding``, post-LN (BART) or pre-LN with a
final ``layer_norm`` (mBART), ``scale_embedding``, a tied or separate
``lm_head`` and ``final_logits_bias``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jpaged.config.model import ModelConfig
from jpaged.layers.attention import AttentionMetadata, paged_attention, write_kv
from jpaged.layers.linear import dense
from jpaged.models.llama import Embedding, Linear
from jpaged.pallas_kernels.attention.reference import (ragged_paged_attention_chunked,
                                                      token_layout)

POSITION_OFFSET = 2  # BART's learned positions start at row 2
_ACT = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu,
        "silu": jax.nn.silu, "swish": jax.nn.silu, "tanh": jnp.tanh}


def hide_encoder_tokens(ids, positions, encoder_lens, query_start_loc, context_lens,
                        block_size: int, fill: int):
    """``ids`` [T] with each encoder (and padding) token replaced by ``fill``
    (out of the vocabulary): the token history penalties read is the
    decoder's own, as transformers' ``repetition_penalty`` sees it."""
    seq, valid, _, _ = token_layout(query_start_loc, context_lens, ids.shape[0])
    enc_len = jnp.where(valid, encoder_lens[seq], 0)
    return jnp.where(positions < (enc_len + block_size - 1) // block_size * block_size,
                     fill, ids)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, d: int, heads: int, dtype, rngs: nnx.Rngs):
        self.q_proj = Linear(d, d, True, dtype, rngs)
        self.k_proj = Linear(d, d, True, dtype, rngs)
        self.v_proj = Linear(d, d, True, dtype, rngs)
        self.out_proj = Linear(d, d, True, dtype, rngs)
        self.heads, self.head_dim = heads, d // heads

    def split(self, x):  # [T, d] -> [T, H, D]
        return x.reshape(x.shape[0], self.heads, self.head_dim)

    def dense_attention(self, x, mask):
        """Encoder self-attention over the step's tokens; ``mask`` [T, T]."""
        q, k, v = (self.split(p(x)).astype(jnp.float32)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        s = jnp.einsum("qhd,khd->hqk", q, k) * self.head_dim ** -0.5
        p = jax.nn.softmax(jnp.where(mask[None], s, -jnp.inf), axis=-1)
        out = jnp.einsum("hqk,khd->qhd", p, v).astype(x.dtype)
        return self.out_proj(out.reshape(x.shape[0], -1))


def _block(x, norm, fn, pre: bool):
    """A residual block, its norm before (mBART) or after (BART) it."""
    if pre:
        return x + fn(norm(x))
    return norm(x + fn(x))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, d, dt = cfg.encoder_decoder, cfg.hidden_size, cfg.jnp_dtype
        self.self_attn = Attention(d, e.encoder_attention_heads, dt, rngs)
        self.self_attn_layer_norm = LayerNorm(d, e.layer_norm_eps, dt)
        self.fc1 = Linear(d, e.encoder_ffn_dim, True, dt, rngs)
        self.fc2 = Linear(e.encoder_ffn_dim, d, True, dt, rngs)
        self.act = _ACT[e.activation]
        self.final_layer_norm = LayerNorm(d, e.layer_norm_eps, dt)
        self.pre = e.pre_layernorm

    def __call__(self, x, mask):
        x = _block(x, self.self_attn_layer_norm,
                   lambda h: self.self_attn.dense_attention(h, mask), self.pre)
        return _block(x, self.final_layer_norm, lambda h: self.fc2(self.act(self.fc1(h))),
                      self.pre)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, d, dt = cfg.encoder_decoder, cfg.hidden_size, cfg.jnp_dtype
        self.self_attn = Attention(d, cfg.num_attention_heads, dt, rngs)
        self.self_attn_layer_norm = LayerNorm(d, e.layer_norm_eps, dt)
        self.encoder_attn = Attention(d, cfg.num_attention_heads, dt, rngs)
        self.encoder_attn_layer_norm = LayerNorm(d, e.layer_norm_eps, dt)
        self.fc1 = Linear(d, e.decoder_ffn_dim, True, dt, rngs)
        self.fc2 = Linear(e.decoder_ffn_dim, d, True, dt, rngs)
        self.act = _ACT[e.activation]
        self.final_layer_norm = LayerNorm(d, e.layer_norm_eps, dt)
        self.pre = e.pre_layernorm

    def __call__(self, x, kv, md_self, md_cross):
        a = self.self_attn

        def self_attention(h):
            nonlocal kv
            out, kv = paged_attention(a.split(a.q_proj(h)), a.split(a.k_proj(h)),
                                      a.split(a.v_proj(h)), kv, md_self,
                                      scale=a.head_dim ** -0.5)
            return a.out_proj(out.reshape(h.shape[0], -1))

        def cross_attention(h):
            nonlocal kv
            c = self.encoder_attn
            q = c.split(c.q_proj(h))
            if md_cross.backend == "reference" and md_cross.mesh is None:
                # One query per sequence: the decode form only (the backend
                # would compile its prefill form too, for nothing).
                out = ragged_paged_attention_chunked(
                    q, *kv, md_cross.block_tables, md_cross.context_lens,
                    md_cross.query_start_loc, scale=c.head_dim ** -0.5,
                    chunk_tokens=max(64, kv[0].shape[1]))
            else:
                none = jnp.zeros((h.shape[0],) + kv[0].shape[2:], h.dtype)  # nothing written
                out, kv = paged_attention(q, none, none, kv, md_cross,
                                          scale=c.head_dim ** -0.5)
            return c.out_proj(out.reshape(h.shape[0], -1))

        x = _block(x, self.self_attn_layer_norm, self_attention, self.pre)
        x = _block(x, self.encoder_attn_layer_norm, cross_attention, self.pre)
        return _block(x, self.final_layer_norm, lambda h: self.fc2(self.act(self.fc1(h))),
                      self.pre), kv


class Stack(nnx.Module):
    """The encoder or the decoder: positions, embedding norm, layers, final norm."""

    def __init__(self, cfg: ModelConfig, layer_cls, num_layers: int, rngs: nnx.Rngs):
        e, d, dt = cfg.encoder_decoder, cfg.hidden_size, cfg.jnp_dtype
        # Untied checkpoints carry the encoder's and decoder's own token tables.
        self.embed_tokens = (None if cfg.tie_word_embeddings else
                             Embedding(cfg.vocab_size, d, dt, rngs))
        self.embed_positions = Embedding(e.max_positions + POSITION_OFFSET, d, dt, rngs)
        self.layernorm_embedding = LayerNorm(d, e.layer_norm_eps, dt)
        self.layers = nnx.List([layer_cls(cfg, rngs) for _ in range(num_layers)])
        self.layer_norm = LayerNorm(d, e.layer_norm_eps, dt) if e.pre_layernorm else None

    def embed(self, tok_embeds, positions):
        x = tok_embeds + self.embed_positions(positions + POSITION_OFFSET)
        return self.layernorm_embedding(x)

    def final(self, x):
        return x if self.layer_norm is None else self.layer_norm(x)


class BartModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e = cfg.encoder_decoder
        self.shared = (Embedding(cfg.vocab_size, cfg.hidden_size, cfg.jnp_dtype, rngs)
                       if cfg.tie_word_embeddings else None)
        self.encoder = Stack(cfg, EncoderLayer, e.encoder_layers, rngs)
        self.decoder = Stack(cfg, DecoderLayer, cfg.num_hidden_layers, rngs)


class BartForConditionalGeneration(nnx.Module):
    """BART/mBART for the paged engine (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.model = BartModel(cfg, rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, False, cfg.jnp_dtype, rngs))
        self.final_logits_bias = nnx.Param(jnp.zeros((1, cfg.vocab_size), cfg.jnp_dtype))

    def _embed_tokens(self, stack: Stack, ids):
        e = self.config.encoder_decoder
        scale = math.sqrt(self.config.hidden_size) if e.scale_embedding else 1.0
        table = self.model.shared if stack.embed_tokens is None else stack.embed_tokens
        return table(ids) * jnp.asarray(scale, self.config.jnp_dtype)

    def __call__(self, input_ids, positions, kv_caches, md: AttentionMetadata,
                 encoder_lens: jax.Array):  # encoder_lens [S]: E of each sequence
        t = input_ids.shape[0]
        num_blocks, bs = kv_caches[0][0].shape[:2]
        nowhere = num_blocks * bs  # an out-of-range slot: the write is dropped
        seq, valid, _, _ = token_layout(md.query_start_loc, md.context_lens, t)
        enc_len = jnp.where(valid, encoder_lens[seq], 0)
        enc_pad = (enc_len + bs - 1) // bs * bs
        is_enc = valid & (positions < enc_len)
        is_dec = valid & (positions >= enc_pad)

        # Encoder, only in steps that carry encoder tokens; then every decoder
        # layer's cross K/V goes to the encoder tokens' slots.
        def encode(_):
            enc = self.model.encoder
            x = enc.embed(self._embed_tokens(enc, input_ids), jnp.where(is_enc, positions, 0))
            mask = (is_enc[:, None] & is_enc[None, :] & (seq[:, None] == seq[None, :])) \
                | jnp.eye(t, dtype=bool)
            for layer in self.model.encoder.layers:
                x = layer(x, mask)
            h = self.model.encoder.final(x)
            return [(a.split(a.k_proj(h)), a.split(a.v_proj(h)))
                    for a in (layer.encoder_attn for layer in self.model.decoder.layers)]

        def skip(_):
            shape = (t,) + kv_caches[0][0].shape[2:]
            return [(jnp.zeros(shape, self.config.jnp_dtype),) * 2
                    for _ in self.model.decoder.layers]

        cross = jax.lax.cond(jnp.any(is_enc), encode, skip, None)
        enc_slots = jnp.where(is_enc, md.slot_mapping, nowhere)
        kv_caches = [write_kv(*kv, k, v, enc_slots) for kv, (k, v) in zip(kv_caches, cross)]

        # Decoder metadata: self-attention over the blocks after the encoder's,
        # cross-attention with each token its own sequence over the encoder's.
        enc_blocks = (encoder_lens + bs - 1) // bs  # [S]
        max_blocks = md.block_tables.shape[1]
        cols = jnp.minimum(enc_blocks[:, None] + jnp.arange(max_blocks), max_blocks - 1)
        md_self = dataclasses.replace(
            md, slot_mapping=jnp.where(is_dec, md.slot_mapping, nowhere),
            block_tables=jnp.take_along_axis(md.block_tables, cols, axis=1),
            context_lens=jnp.maximum(md.context_lens - enc_blocks * bs, 0))
        cross_blocks = min(max_blocks, -(-self.config.encoder_decoder.max_positions // bs))
        md_cross = dataclasses.replace(
            md, slot_mapping=jnp.full((t,), nowhere, jnp.int32),
            block_tables=md.block_tables[seq, :cross_blocks],
            context_lens=jnp.where(is_dec, enc_len, 0),
            query_start_loc=jnp.arange(t + 1, dtype=jnp.int32), decode_only=True)

        dec = self.model.decoder
        x = dec.embed(self._embed_tokens(dec, input_ids),
                      jnp.where(is_dec, positions - enc_pad, 0))
        new_caches = []
        for layer, kv in zip(dec.layers, kv_caches):
            x, kv = layer(x, kv, md_self, md_cross)
            new_caches.append(kv)
        return dec.final(x), new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:  # [N, d] -> [N, V] f32
        w = (self.model.shared.weight if self.lm_head is None
             else self.lm_head.weight).get_value()
        return (dense(hidden, w) + self.final_logits_bias[...]).astype(jnp.float32)

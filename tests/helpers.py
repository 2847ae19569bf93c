"""Shared test helpers: tiny checkpoints (cached per session) and a one-shot
paged prefill that returns logits for every token of a batch of prompts."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jpaged.layers.attention import AttentionMetadata


def prefill_logits(cfg, graphdef, params, prompts: list[list[int]], block_size: int = 8,
                   backend: str = "reference") -> list[np.ndarray]:
    """Run all prompts as one ragged batch through the paged forward.

    Returns per prompt an array [len(prompt), vocab] of float32 logits.
    """
    lens = [len(p) for p in prompts]
    blocks_per = [-(-n // block_size) for n in lens]
    max_blocks = max(blocks_per)
    num_blocks = 1 + sum(blocks_per)
    tables = np.zeros((len(prompts), max_blocks), np.int32)
    nxt, slots = 1, []
    for i, n in enumerate(lens):
        ids = list(range(nxt, nxt + blocks_per[i]))
        nxt += blocks_per[i]
        tables[i, :len(ids)] = ids
        slots += [ids[j // block_size] * block_size + j % block_size for j in range(n)]
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    md = AttentionMetadata(
        slot_mapping=jnp.asarray(slots, jnp.int32), block_tables=jnp.asarray(tables),
        context_lens=jnp.asarray(lens, jnp.int32), query_start_loc=jnp.asarray(qsl),
        backend=backend)
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    kv = [(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))
          for _ in range(cfg.num_hidden_layers)]
    ids = jnp.asarray(np.concatenate(prompts), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in lens]), jnp.int32)

    @jax.jit
    def fwd(params, kv, ids, pos, md):
        model = nnx.merge(graphdef, params)
        h, _ = model(ids, pos, kv, md)
        return model.compute_logits(h)

    logits = np.asarray(fwd(params, kv, ids, pos, md))
    return [logits[qsl[i]:qsl[i + 1]] for i in range(len(prompts))]


def hf_logits(model_dir: str, prompts: list[list[int]], dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype)
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            logits = model(torch.tensor([p])).logits[0].float().numpy()
            out.append(logits)
    return out

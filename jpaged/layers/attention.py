"""Paged attention for the models: metadata, the KV write and backend dispatch.

Every attention layer of a step does two things, in this order:

1. scatter the step's new K/V into the layer's donated cache at
   ``slot_mapping`` (``block_id * block_size + offset``; padding tokens carry
   an out-of-range slot and are dropped), and
2. attend each query token to its sequence's cached K/V through the block
   table, with the backend named in the metadata: ``reference`` (pure jnp,
   the oracle's form in `jpaged.layers.attention_cpu`, tiled for prefill;
   the CPU default) or ``pallas`` (the kernels in
   `jpaged.pallas_kernels`, interpreted on CPU).

The KV cache of one layer is ``(k_cache, v_cache)``, each
``[num_blocks, block_size, num_kv_heads, head_dim]``; the whole cache is a
list of those per layer (one array per layer donates cheaply; see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jpaged.layers.attention_cpu import cpu_paged_attention

BACKENDS = ("auto", "reference", "pallas")


def resolve_backend(name: str) -> str:
    """`auto` picks Pallas on GPUs and the reference elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not supported; "
                         f"choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "reference"
    return name


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs, padded to the step's bucket."""

    slot_mapping: jax.Array  # [T] int32, out of range for padding tokens
    block_tables: jax.Array  # [S, max_blocks_per_seq] int32
    context_lens: jax.Array  # [S] int32, including this step's tokens; 0 pads
    query_start_loc: jax.Array  # [S + 1] int32
    # Static: which implementation runs and whether every sequence has exactly
    # one query token (then the decode kernel applies, with T == S).
    backend: str = dataclasses.field(default="reference", metadata=dict(static=True))
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))


def write_kv(
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    k: jax.Array,  # [T, num_kv_heads, head_dim]
    v: jax.Array,  # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [T] int32
) -> tuple[jax.Array, jax.Array]:
    """Scatter new K/V into the cache; out-of-range slots are dropped."""
    shape = k_cache.shape
    flat = (shape[0] * shape[1],) + shape[2:]
    k_cache = k_cache.reshape(flat).at[slot_mapping].set(
        k.astype(k_cache.dtype), mode="drop").reshape(shape)
    v_cache = v_cache.reshape(flat).at[slot_mapping].set(
        v.astype(v_cache.dtype), mode="drop").reshape(shape)
    return k_cache, v_cache


def reference_chunk_tokens(num_tokens: int, block_size: int) -> int:
    """Context chunk for the CPU reference: about 4096 query-token x context
    slots a chunk, within [64, 256] (measured on XLA:CPU: 8 decode tokens ran
    fastest with 256-token chunks, 32 with 128, 64 and more with 64)."""
    chunk = 64
    while chunk < 256 and chunk * 2 * num_tokens <= 4096:
        chunk *= 2
    return max(chunk, block_size)


def paged_attention(
    q: jax.Array,  # [T, num_heads, head_dim]
    k: jax.Array,  # [T, num_kv_heads, head_dim]
    v: jax.Array,  # [T, num_kv_heads, head_dim]
    kv_cache: tuple[jax.Array, jax.Array],
    md: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Write this step's K/V, then attend. Returns ``(out [T, H, D], kv_cache)``."""
    k_cache, v_cache = write_kv(*kv_cache, k, v, md.slot_mapping)
    if md.backend == "reference":
        out = cpu_paged_attention(
            q, k_cache, v_cache, md.block_tables, md.context_lens, md.query_start_loc,
            scale=scale, sliding_window=sliding_window,
            decode_chunk=reference_chunk_tokens(q.shape[0], k_cache.shape[1]))
    elif md.backend == "pallas":
        interpret = jax.default_backend() != "gpu"
        if md.decode_only:
            from jpaged.pallas_kernels.attention.decode import paged_decode_attention
            # One token per sequence: token i is sequence i. The token bucket
            # may exceed the sequence count; the extra tokens are padding.
            num_seqs = md.block_tables.shape[0]
            out = paged_decode_attention(
                q[:num_seqs], k_cache, v_cache, md.block_tables, md.context_lens,
                scale=scale, sliding_window=sliding_window, interpret=interpret)
            out = jnp.pad(out, ((0, q.shape[0] - num_seqs), (0, 0), (0, 0)))
        else:
            from jpaged.pallas_kernels.attention.ragged import ragged_paged_attention
            out = ragged_paged_attention(
                q, k_cache, v_cache, md.block_tables, md.context_lens,
                md.query_start_loc, scale=scale, sliding_window=sliding_window,
                interpret=interpret)
    else:
        raise ValueError(f"attention backend {md.backend!r} is not resolved; "
                         "call resolve_backend first")
    return out, (k_cache, v_cache)

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
list of those per layer (one array per layer donates cheaply).

Under tensor parallelism (``mesh`` in the metadata) q, k, v and the cache are
split by heads along the mesh's ``model`` axis. The reference runs as one
program that XLA partitions (GSPMD: the head axis is a batch axis of every
gather, scatter and dot, so each device works on its own heads); the Pallas
kernels, which XLA cannot partition, run per device under `jax.shard_map`.
With fewer KV heads than devices the cache holds one copy of a KV head per
device, and k/v are repeated to match before the write.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpaged.distributed.sharding import heads_spec, kv_cache_spec
from jpaged.layers.attention_cpu import cpu_paged_attention
from jpaged.layers.kv_quant import is_fp8, quantize

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
    # The tensor-parallel mesh (None: one device).
    mesh: Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))
    # fp8 KV cache (jpaged.layers.kv_quant): per layer (k_scale, v_scale), and
    # the pair of the layer being run (`for_layer` picks it). Static floats.
    kv_scales: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    kv_scale: tuple = dataclasses.field(default=(1.0, 1.0), metadata=dict(static=True))

    def for_layer(self, i: int) -> "AttentionMetadata":
        """This metadata with layer ``i``'s KV scales (unchanged without scales)."""
        if not self.kv_scales:
            return self
        return dataclasses.replace(self, kv_scale=tuple(self.kv_scales[i]))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class RowSelection:
    """The rows a model's last layer computes past its K/V write: only the
    tokens whose logits the step samples. Every layer's K and V still go to
    the cache for all tokens; the last layer's attention, o_proj and MLP (and
    the final norm) then run on ``rows`` only: a 512-token prefill step
    samples at most 128 rows, most often a handful, so when the rows that
    sample all lie in the first ``few`` (32) the layer runs on those alone
    (a `lax.cond`; A/B on a 512-token prefill step of the ~32M Llama: 2-4 ms
    less in six pairs of eight replays, 128.4 -> 126.7 ms at best).

    ``md`` attends those rows: row j is its own sequence, one query token at
    its position, over its sequence's blocks (context 0, so zeros, for rows
    that sample nothing); it keeps the step's ``slot_mapping`` for the K/V
    write."""

    rows: jax.Array  # [S] int32 token index of each selected row
    md: AttentionMetadata
    needed: jax.Array  # int32: the wanted rows all lie in rows[:needed]
    # Static: when needed <= few < S, the layer runs on rows[:few] only.
    few: int = dataclasses.field(default=0, metadata=dict(static=True))

    def run(self, fn, *xs):
        """``fn(*xs, md)`` on the selected rows (each x has them first); on
        the first `few` of them only when the wanted rows all lie there, the
        rest zeros."""
        s = self.rows.shape[0]
        if not 0 < self.few < s:
            return fn(*xs, self.md)
        f, md = self.few, self.md
        md_few = dataclasses.replace(md, block_tables=md.block_tables[:f],
                                     context_lens=md.context_lens[:f],
                                     query_start_loc=md.query_start_loc[:f + 1])

        def few(xs):
            y = fn(*(x[:f] for x in xs), md_few)
            return jnp.pad(y, ((0, s - f),) + ((0, 0),) * (y.ndim - 1))

        return jax.lax.cond(self.needed <= f, few, lambda xs: fn(*xs, md), xs)


def select_rows(md: AttentionMetadata, rows, positions, wanted, few: int = 0) -> RowSelection:
    """A `RowSelection` of token indices ``rows`` [S] (each the last token of
    its sequence's chunk, as the step's ``logits_indices`` are), ``positions``
    [T] the step's positions and ``wanted`` [S] bool which rows matter."""
    seq = jnp.searchsorted(md.query_start_loc[1:], rows, side="right")
    seq = jnp.minimum(seq, md.block_tables.shape[0] - 1)
    s = rows.shape[0]
    sel = dataclasses.replace(
        md, block_tables=md.block_tables[seq],
        context_lens=jnp.where(wanted, positions[rows] + 1, 0).astype(jnp.int32),
        query_start_loc=jnp.arange(s + 1, dtype=jnp.int32), decode_only=False)
    return RowSelection(rows=rows, md=sel, needed=rows_needed(wanted), few=few)


def rows_needed(wanted) -> jax.Array:
    """One past the last True of ``wanted`` [S] (0 if none): the rows that
    matter all lie in the first that many."""
    s = wanted.shape[0]
    return jnp.max(jnp.where(wanted, jnp.arange(1, s + 1, dtype=jnp.int32), 0))


def write_kv(
    k_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: jax.Array,  # [num_blocks, block_size, num_kv_heads, head_dim]
    k: jax.Array,  # [T, num_kv_heads, head_dim]
    v: jax.Array,  # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [T] int32
    kv_scale: tuple = (1.0, 1.0),
) -> tuple[jax.Array, jax.Array]:
    """Scatter new K/V into the cache; out-of-range slots are dropped. An fp8
    cache stores ``x / scale``, saturated (`jpaged.layers.kv_quant`)."""
    if is_fp8(k_cache.dtype):
        k, v = quantize(k, kv_scale[0]), quantize(v, kv_scale[1])
    bs = k_cache.shape[1]
    # (block, offset) indices, not a flat view of the cache: a reshape of a
    # cache with one KV head per device (under TP) made XLA:CPU copy it.
    blk, off = slot_mapping // bs, slot_mapping % bs
    k_cache = k_cache.at[blk, off].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[blk, off].set(v.astype(v_cache.dtype), mode="drop")
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
    if md.backend == "reference":
        kv_cache = write_step_kv(k, v, kv_cache, md)
        return attend_cached(q, kv_cache, md, scale=scale,
                             sliding_window=sliding_window), kv_cache
    k, v = _cache_heads(k, v, kv_cache)
    if md.mesh is None or md.mesh.size == 1:
        return _attend(q, k, v, kv_cache, md, scale, sliding_window)
    heads = NamedSharding(md.mesh, heads_spec())
    q, k, v = (jax.lax.with_sharding_constraint(x, heads) for x in (q, k, v))
    rep = PartitionSpec()
    cache = (kv_cache_spec(), kv_cache_spec())
    per_shard = jax.shard_map(
        lambda q, k, v, kv, md: _attend(q, k, v, kv, md, scale, sliding_window),
        mesh=md.mesh, in_specs=(heads_spec(),) * 3 + (cache, rep),
        out_specs=(heads_spec(), cache), check_vma=False)
    return per_shard(q, k, v, kv_cache, dataclasses.replace(md, mesh=None))


def _cache_heads(k, v, kv_cache):
    """k and v with the cache's KV heads: with fewer KV heads than devices
    the cache holds one copy per device."""
    copies = kv_cache[0].shape[2] // k.shape[1]
    if copies > 1:
        k, v = jnp.repeat(k, copies, axis=1), jnp.repeat(v, copies, axis=1)
    return k, v


def write_step_kv(k, v, kv_cache, md: AttentionMetadata):
    """The reference backend's first half of `paged_attention`: write this
    step's K/V (under tensor parallelism XLA partitions it by heads)."""
    assert md.backend == "reference", "the write alone is the reference backend's"
    k, v = _cache_heads(k, v, kv_cache)
    if md.mesh is not None and md.mesh.size > 1:
        heads = NamedSharding(md.mesh, heads_spec())
        k, v = (jax.lax.with_sharding_constraint(x, heads) for x in (k, v))
    return write_kv(*kv_cache, k, v, md.slot_mapping, md.kv_scale)


def attend_cached(q, kv_cache, md: AttentionMetadata, *, scale: float,
                  sliding_window: int | None = None) -> jax.Array:
    """The reference backend's second half of `paged_attention`: attend ``q``
    to the cache as it is. Returns ``out [T, H, D]``."""
    assert md.backend == "reference", "attending alone is the reference backend's"
    if md.mesh is not None and md.mesh.size > 1:
        q = jax.lax.with_sharding_constraint(q, NamedSharding(md.mesh, heads_spec()))
    return _attend_cache(q, *kv_cache, md, scale, sliding_window)


def _attend(q, k, v, kv_cache, md: AttentionMetadata, scale, sliding_window):
    k_cache, v_cache = write_kv(*kv_cache, k, v, md.slot_mapping, md.kv_scale)
    return _attend_cache(q, k_cache, v_cache, md, scale, sliding_window), (k_cache, v_cache)


def _attend_cache(q, k_cache, v_cache, md: AttentionMetadata, scale, sliding_window):
    ks, vs = md.kv_scale
    if md.backend == "reference":
        out = cpu_paged_attention(
            q, k_cache, v_cache, md.block_tables, md.context_lens, md.query_start_loc,
            scale=scale, sliding_window=sliding_window, k_scale=ks, v_scale=vs,
            decode_chunk=reference_chunk_tokens(q.shape[0], k_cache.shape[1]),
            # Under tensor parallelism XLA partitions the attention by heads;
            # it cannot partition a custom call.
            native=False if md.mesh is not None else None)
    elif md.backend == "pallas":
        interpret = jax.default_backend() != "gpu"
        if md.decode_only:
            from jpaged.pallas_kernels.attention.decode import paged_decode_attention
            # One token per sequence: token i is sequence i. The token bucket
            # may exceed the sequence count; the extra tokens are padding.
            num_seqs = md.block_tables.shape[0]
            out = paged_decode_attention(
                q[:num_seqs], k_cache, v_cache, md.block_tables, md.context_lens,
                scale=scale, sliding_window=sliding_window, k_scale=ks, v_scale=vs,
                interpret=interpret)
            out = jnp.pad(out, ((0, q.shape[0] - num_seqs), (0, 0), (0, 0)))
        else:
            from jpaged.pallas_kernels.attention.ragged import ragged_paged_attention
            out = ragged_paged_attention(
                q, k_cache, v_cache, md.block_tables, md.context_lens,
                md.query_start_loc, scale=scale, sliding_window=sliding_window,
                k_scale=ks, v_scale=vs, interpret=interpret)
    else:
        raise ValueError(f"attention backend {md.backend!r} is not resolved; "
                         "call resolve_backend first")
    return out

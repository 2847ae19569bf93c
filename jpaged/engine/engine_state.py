"""A snapshot of the engine's memory and scheduler for the live dashboard:
`engine_state` is computed on request, in the engine's own thread (the
server queues it with `AsyncLLM.call`), from what the engine keeps anyway:
the block pool's free-queue counts and its numpy mirrors of ref counts and
hashed flags, the scheduler's queues, each running request's block list and
the persistent batch's block-table rows. Nothing here runs per step; the
whole-pool work is a handful of numpy passes over ``num_blocks`` entries,
and each running request is touched once (its block ids are a slice of its
block-table row, checked against its block list at both ends; a request
without a row yet, such as an ``n > 1`` sibling forked since the last step,
is read from its block list).
"""

from __future__ import annotations

import json
import operator
import os
import time

import numpy as np

DEFAULT_CELLS = 4096
MAX_CELLS = 1 << 16
_BLOCK_ID = operator.attrgetter("block_id")


def check_cells(cells) -> int:
    """The grid size asked for, as an int in [1, MAX_CELLS] (ValueError naming it)."""
    try:
        n = int(cells)
    except (TypeError, ValueError):
        raise ValueError(f"cells={cells!r} must be an integer") from None
    if not 1 <= n <= MAX_CELLS:
        raise ValueError(f"cells={n} must be between 1 and {MAX_CELLS}")
    return n


def block_grid(pool, owner: np.ndarray, cells: int) -> dict:
    """The KV grid: blocks 1..N (block 0 is the null block that pads block
    tables) in at most ``cells`` cells of ``blocks_per_cell`` consecutive
    blocks. Per cell, numpy arrays (encoded outside the engine thread) count
    blocks in use by one request (``used``), shared by several (``shared``:
    ref count > 1, counted once) and free but keeping a prefix hash that a
    later prompt can revive (``cached``); the rest of the cell is free.
    ``owner`` is the index in ``requests`` of a running request holding a
    block of the cell (the last listed), or -1."""
    n = pool.num_blocks - 1
    per = -(-n // cells)
    ref, hashed = pool.ref_counts[1:], pool.hashed[1:]
    counts = [(ref == 1).view(np.uint8), (ref > 1).view(np.uint8),
              ((ref == 0) & hashed).view(np.uint8)]
    own = owner[1:]
    if per > 1:
        starts = np.arange(0, n, per)
        counts = [np.add.reduceat(c, starts, dtype=np.int32) for c in counts]
        own = np.maximum.reduceat(own, starts)
    used, shared, cached = counts
    return {"cells": len(own), "blocks_per_cell": per, "used": used, "shared": shared,
            "cached": cached, "owner": own}


def to_json(state: dict) -> bytes:
    """``state`` as compact JSON (numpy arrays as lists)."""
    return json.dumps(state, separators=(",", ":"),
                      default=lambda a: a.tolist()).encode()


def running_requests(kv, running, rows: dict, block_table: np.ndarray | None):
    """The running requests as columns (``requests`` of the state), and all
    their block ids with the index of the request holding each."""
    k = len(running)
    rids = [r.request_id for r in running]
    lists = [kv.req_to_blocks.get(rid, ()) for rid in rids]
    counts = np.fromiter(map(len, lists), np.int64, k)
    # A request's block ids are a slice of its block-table row when that row
    # agrees with its block list at both ends; otherwise (no row yet: an
    # n > 1 sibling forked since the last step) they come from the list.
    row = np.array([rows.get(rid, -1) for rid in rids], np.int64)
    ok = (row >= 0) & (counts > 0)
    if block_table is not None and ok.any():
        ends = np.array([b[-1].block_id if b else -1 for b in lists], np.int64)
        heads = np.array([b[0].block_id if b else -1 for b in lists], np.int64)
        r, last = np.where(ok, row, 0), np.maximum(counts - 1, 0)
        ok &= (block_table[r, 0] == heads) & (block_table[r, last] == ends)
    else:
        ok[:] = False
    ids = [block_table[i, :n] if good else np.fromiter(map(_BLOCK_ID, blocks), np.int32, n)
           for i, n, good, blocks in zip(row.tolist(), counts.tolist(), ok.tolist(), lists)]
    # intp: numpy would convert int32 indices on each of the two uses below.
    all_ids = np.concatenate(ids).astype(np.intp) if ids else np.zeros(0, np.intp)
    holder = np.repeat(np.arange(k, dtype=np.int32), counts)
    columns = {"id": rids, "group": [r.group_id for r in running], "blocks": counts,
               "prompt_tokens": [len(r.prompt_token_ids) for r in running],
               "computed_tokens": [r.num_computed_tokens for r in running],
               "generated_tokens": [len(r.all_token_ids) - len(r.prompt_token_ids)
                                    for r in running]}
    return columns, all_ids, holder, counts


def engine_state(engine, cells: int = DEFAULT_CELLS) -> dict:
    """The dashboard's state object; call it in the engine thread."""
    kv, sched = engine.kv, engine.scheduler
    pool = kv.pool
    batch = getattr(getattr(engine, "runner", None), "batch", None)
    rows = batch.rows if batch is not None else {}
    table = batch.block_table if batch is not None else None
    requests, ids, holder, counts = running_requests(kv, sched.running, rows, table)
    # Shared blocks per request: differences of a running sum over its slice.
    shared = np.zeros(len(ids) + 1, np.int32)
    np.cumsum(np.take(pool.ref_counts, ids) > 1, out=shared[1:])
    ends = np.cumsum(counts)
    requests["shared_blocks"] = shared[ends] - shared[ends - counts]
    owner = np.full(pool.num_blocks, -1, np.int32)
    owner[ids] = holder
    usable = pool.num_blocks - 1
    free = pool.get_num_free_blocks()
    cfg, sc = engine.config, sched.config
    return {
        "time": time.time(),
        "num_blocks": usable,
        "block_size": kv.block_size,
        "blocks_in_use": usable - free,
        "blocks_free": free,
        "blocks_cached_free": pool.get_num_cached_free_blocks(),
        "blocks_shared": int(np.count_nonzero(pool.ref_counts > 1)),
        "kv_usage": (usable - free) / usable,
        "host_blocks": kv.num_host_blocks,
        "host_blocks_in_use": kv.num_used_host_blocks,
        "num_running": len(sched.running),
        "num_waiting": len(sched.waiting),
        "num_preempted_total": sched.num_preemptions,
        "prefix_cache_queries": kv.prefix_cache_queries,
        "prefix_cache_hits": kv.prefix_cache_hits,
        "prompt_tokens_total": engine.prompt_tokens_total,
        "generation_tokens_total": engine.generation_tokens_total,
        "requests": requests,
        "grid": block_grid(pool, owner, cells),
        "settings": {
            "model": os.path.basename(str(cfg.model).rstrip("/")),
            "block_size": kv.block_size, "num_blocks": usable,
            "max_num_seqs": sc.max_num_seqs,
            "max_num_batched_tokens": sc.max_num_batched_tokens,
            "max_model_len": sc.max_model_len,
            "enable_prefix_caching": kv.enable_caching,
            "preemption_mode": sc.preemption_mode,
            "scheduling_policy": sc.scheduling_policy,
            "async_scheduling": engine.async_scheduling,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "attention_backend": engine.runner.cfg.backend,
        },
    }

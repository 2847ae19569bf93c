#!/usr/bin/env python3
"""CPU paged attention: XLA's (layers/attention_cpu.py) against the native
kernel (jpaged/cpu_kernels/paged_attention.cc), side by side in one run.

One layer of the ~32M Llama of scripts/bench_throughput.py (8 query heads, 2
KV heads, head_dim 64, float32, 16-token blocks placed at random in the
cache), over the step shapes its workloads produce: a 512-token prefill
chunk, the chunk that finishes one prompt and starts another, a mixed step of
100 decodes and a 300-token prefill, and decode-only steps. Best of 7 each,
after checking that both give the same numbers.

Example: python scripts/bench_cpu_attention.py
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jpaged import cpu_kernels
from jpaged.layers.attention import reference_chunk_tokens
from jpaged.layers.attention_cpu import cpu_paged_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_matmul import best_of

H, KVH, D, BS, NB = 8, 2, 64, 16, 8193


def step(rng, q_lens, ctx, num_seqs=128, num_tokens=512, max_blocks=64):
    tables = np.zeros((num_seqs, max_blocks), np.int32)
    free = 1 + rng.permutation(NB - 1)
    used = 0
    for i, c in enumerate(ctx):
        n = -(-c // BS)
        tables[i, :n] = free[used:used + n]
        used += n
    qsl = np.zeros(num_seqs + 1, np.int32)
    qsl[1:len(q_lens) + 1] = np.cumsum(q_lens)
    qsl[len(q_lens) + 1:] = qsl[len(q_lens)]
    lens = np.zeros(num_seqs, np.int32)
    lens[:len(ctx)] = ctx
    q = jnp.asarray(rng.standard_normal((num_tokens, H, D), np.float32))
    return q, jnp.asarray(tables), jnp.asarray(lens), jnp.asarray(qsl)


def main() -> None:
    if cpu_kernels.load() is None:
        raise SystemExit(f"native kernels unavailable: {cpu_kernels.unavailable_reason()}")
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((NB, BS, KVH, D), np.float32))
    v = jnp.asarray(rng.standard_normal((NB, BS, KVH, D), np.float32))
    decodes = [int(c) for c in rng.integers(50, 660, 100)]
    steps = {
        "prefill 512 tokens (context 512)": step(rng, [512], [512]),
        "prefill 148 @ 660 + 364 @ 364": step(rng, [148, 364], [660, 364]),
        "100 decodes (50-660) + 300 @ 300": step(rng, [1] * 100 + [300], decodes + [300]),
        "64 decodes (context 50-400)": step(rng, [1] * 64, [int(c) for c in rng.integers(
            50, 400, 64)], num_tokens=64),
        "128 decodes (context 660)": step(rng, [1] * 128, [660] * 128, num_tokens=128),
        "8 decodes (context 100-300)": step(rng, [1] * 8, [int(c) for c in rng.integers(
            100, 300, 8)], num_tokens=8),
    }
    print(f"one layer: {H} heads, {KVH} KV heads, head_dim {D}, float32, block {BS}")
    for name, (q, tables, lens, qsl) in steps.items():
        chunk = reference_chunk_tokens(q.shape[0], BS)
        xla = jax.jit(lambda *a, c=chunk: cpu_paged_attention(*a, scale=D ** -0.5, decode_chunk=c,
                                                               native=False))
        nat = jax.jit(lambda *a: cpu_paged_attention(*a, scale=D ** -0.5, native=True))
        args = (q, k, v, tables, lens, qsl)
        err = float(jnp.max(jnp.abs(xla(*args) - nat(*args))))
        assert err < 1e-4, f"{name}: native and XLA disagree by {err}"
        t_xla, t_nat = best_of(xla, *args, iters=7), best_of(nat, *args, iters=7)
        print(f"{name:34s} XLA {t_xla * 1e3:7.2f} ms  native {t_nat * 1e3:7.2f} ms  "
              f"native/XLA speed {t_xla / t_nat:5.2f}x")


if __name__ == "__main__":
    main()

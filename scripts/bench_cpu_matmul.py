#!/usr/bin/env python3
"""How fast XLA reads weights through a matrix product, by number of rows.

A jitted chain of 30 float32 [M, 576] x [576, 1536] products (SmolLM2-135M's
MLP shapes, 106 MB of weights) for M = 1, 2, 4, 8, 16, 32 rows, best of 10;
prints milliseconds and the weight bytes read per second. This is why the CPU
backend has a one-token bucket (jpaged/runner/buckets.py): one row runs as a
matrix-vector product at about the memory bandwidth, a few rows at about half.

Example: python scripts/bench_cpu_matmul.py
         XLA_FLAGS=--xla_cpu_use_xnnpack=true python scripts/bench_cpu_matmul.py
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    d, f = 576, 1536
    key = jax.random.key(0)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (d, f)) for i in range(args.layers)]

    @jax.jit
    def chain(x, ws):
        for w in ws:
            x = jnp.tanh(x @ w)[:, :d]
        return x

    mbytes = args.layers * d * f * 4 / 1e6
    print(f"{args.layers} products of [M, {d}] x [{d}, {f}] float32, {mbytes:.0f} MB of weights")
    for m in (int(r) for r in args.rows.split(",")):
        x = jnp.ones((m, d))
        chain(x, ws).block_until_ready()
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            chain(x, ws).block_until_ready()
            best = min(best, time.perf_counter() - t)
        gflop = 2 * m * mbytes / 4 / 1e3
        print(f"M={m:3d}: {best * 1e3:7.2f} ms, {mbytes / best / 1e3:5.1f} GB/s of weights, "
              f"{gflop / best:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()

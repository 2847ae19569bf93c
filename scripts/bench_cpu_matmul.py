#!/usr/bin/env python3
"""How fast XLA reads weights through a matrix product, by number of rows.

A jitted chain of 30 float32 [M, 576] x [576, 1536] products (SmolLM2-135M's
MLP shapes, 106 MB of weights) for M = 1, 2, 4, 8, 16, 32 rows, best of 10;
prints milliseconds and the weight bytes read per second. This is why the CPU
backend has a one-token bucket (jpaged/runner/buckets.py): one row runs as a
matrix-vector product at about the memory bandwidth, a few rows at about half.

``--native`` measures, side by side in the same run, the product as the model
runs it (weights stored [out, in], ``x @ w.T``) through XLA's dot and through
jpaged's native CPU kernel (jpaged/cpu_kernels/matmul.cc): 15 pairs of
[M, 576] x [1536, 576]^T and [M, 1536] x [576, 1536]^T, with checks that the
two agree. ``--native --llama`` does the same for the four products of each
of the 8 layers of scripts/bench_throughput.py's ~32M Llama (hidden 512,
intermediate 1536, 8 heads, 2 KV heads). The two tables set
`cpu_kernels.MATMUL_MAX_ROWS`.

``--mlp`` times the whole MLP, x + down(silu(gate(x)) * up(x)), through XLA's
products, the native product and the fused native MLP (`cpu_kernels.mlp`),
which sets `cpu_kernels.MLP_MAX_ROWS`.

Example: python scripts/bench_cpu_matmul.py
         python scripts/bench_cpu_matmul.py --native --rows 1,2,4,8,16,32,64,128
         python scripts/bench_cpu_matmul.py --native --llama --rows 32,64,96,128,256
         python scripts/bench_cpu_matmul.py --mlp --llama --rows 16,96,512
         XLA_FLAGS=--xla_cpu_use_xnnpack=true python scripts/bench_cpu_matmul.py
"""

from __future__ import annotations

import argparse
import time


def best_of(fn, *args, iters=10):
    """Best seconds of ``iters`` calls of the jitted ``fn``, after one call that
    compiles it; asserts that nothing compiled inside the timed calls."""
    fn(*args).block_until_ready()
    compiled = fn._cache_size()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t)
    assert fn._cache_size() == compiled, "a timed call compiled"
    return best


def xla_chain(args):
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
        best = best_of(chain, jnp.ones((m, d)), ws)
        gflop = 2 * m * mbytes / 4 / 1e3
        print(f"M={m:3d}: {best * 1e3:7.2f} ms, {mbytes / best / 1e3:5.1f} GB/s of weights, "
              f"{gflop / best:6.1f} GFLOP/s")


def native_vs_xla(args):
    import jax
    import jax.numpy as jnp

    from jpaged import cpu_kernels

    if cpu_kernels.load() is None:
        raise SystemExit(f"native kernels unavailable: {cpu_kernels.unavailable_reason()}")
    cpu_kernels.keep_freed_memory()  # as the engine runs: no page faults on the outputs
    key = jax.random.key(0)

    def weights(shapes):  # [out, in] each
        return [jax.random.normal(jax.random.fold_in(key, i), s) * 0.05
                for i, s in enumerate(shapes)]

    if args.llama:  # per layer: qkv, o, gate_up, down; each output cut to the next input
        d, layers = 512, 8
        ws = weights([(768, 512), (512, 512), (3072, 512), (512, 1536)] * layers)
        what = f"{len(ws)} products x @ w.T (the ~32M Llama's {layers} layers)"
    else:
        d, f = 576, 1536
        ws = weights([(f, d), (d, f)] * (args.layers // 2))
        what = f"{len(ws)} products x @ w.T, w [1536, 576] and [576, 1536]"

    def chain(mm):
        @jax.jit
        def run(x, ws):
            for w in ws:
                x = jnp.tanh(mm(x[:, :w.shape[1]], w))
            return x
        return run

    xla = chain(lambda x, w: jnp.einsum("ti,oi->to", x, w))
    native = chain(cpu_kernels.matmul_nt)
    mbytes = sum(w.size for w in ws) * 4 / 1e6
    print(f"{what} float32, {mbytes:.0f} MB of weights; best of 10, side by side")
    for m in (int(r) for r in args.rows.split(",")):
        x = jax.random.normal(key, (m, d))
        err = float(jnp.max(jnp.abs(xla(x, ws) - native(x, ws))))
        assert err < 1e-3, f"native and XLA disagree at M={m}: {err}"
        t_xla, t_nat = best_of(xla, x, ws), best_of(native, x, ws)
        gflop = 2 * m * mbytes / 4 / 1e3
        print(f"M={m:3d}: XLA {t_xla * 1e3:7.2f} ms ({gflop / t_xla:6.1f} GFLOP/s)  native "
              f"{t_nat * 1e3:7.2f} ms ({gflop / t_nat:6.1f} GFLOP/s)  native/XLA speed "
              f"{t_xla / t_nat:4.2f}x")


def mlp_vs_xla(args):
    """The Llama MLP x + down(silu(gate(x)) * up(x)) of 8 layers (--llama's
    shapes) or 30 (SmolLM2's), three ways side by side: XLA's products, the
    native product for each, and the fused native MLP."""
    import jax
    import jax.numpy as jnp

    from jpaged import cpu_kernels

    if cpu_kernels.load() is None:
        raise SystemExit(f"native kernels unavailable: {cpu_kernels.unavailable_reason()}")
    cpu_kernels.keep_freed_memory()
    key = jax.random.key(0)
    d, i, layers = (512, 1536, 8) if args.llama else (576, 1536, 30)
    ws = [(jax.random.normal(jax.random.fold_in(key, 2 * n), (2 * i, d)) * 0.05,
           jax.random.normal(jax.random.fold_in(key, 2 * n + 1), (d, i)) * 0.05)
          for n in range(layers)]

    def chain(mlp):
        @jax.jit
        def run(x, ws):
            for gate_up, down in ws:
                x = x + mlp(x, gate_up, down)
            return x
        return run

    def unfused(mm):
        def mlp(x, gate_up, down):
            h = mm(x, gate_up)
            return mm(jax.nn.silu(h[:, :i]) * h[:, i:], down)
        return mlp

    runs = {"XLA": chain(unfused(lambda x, w: jnp.einsum("ti,oi->to", x, w))),
            "native products": chain(unfused(cpu_kernels.matmul_nt)),
            "fused": chain(cpu_kernels.mlp)}
    print(f"{layers} MLPs [{d} -> 2 x {i} -> {d}] float32; best of 10, side by side")
    for m in (int(r) for r in args.rows.split(",")):
        x = jax.random.normal(key, (m, d))
        want = runs["XLA"](x, ws)
        times = {}
        for name, fn in runs.items():
            err = float(jnp.max(jnp.abs(fn(x, ws) - want) / (1 + jnp.abs(want))))
            assert err < 1e-3, f"{name} and XLA disagree at M={m}: {err}"
            times[name] = best_of(fn, x, ws)
        gflop = 2 * m * 3 * d * i * layers / 1e9
        print(f"M={m:3d}: " + "  ".join(f"{name} {t * 1e3:7.2f} ms ({gflop / t:5.1f} GFLOP/s)"
                                        for name, t in times.items())
              + f"  fused/XLA speed {times['XLA'] / times['fused']:4.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--native", action="store_true",
                    help="XLA's x @ w.T against the native CPU kernel, side by side")
    ap.add_argument("--llama", action="store_true",
                    help="with --native or --mlp: the ~32M Llama's shapes instead of SmolLM2's")
    ap.add_argument("--mlp", action="store_true",
                    help="the whole MLP: XLA, native products, and the fused native MLP")
    args = ap.parse_args()
    if args.mlp:
        mlp_vs_xla(args)
    else:
        native_vs_xla(args) if args.native else xla_chain(args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Quantized-weight matmuls on a GPU: XLA's fused dequantize + GEMM against the
Pallas kernel (and fp8 tensor cores), on Llama-3-8B projection shapes.

For a GPU machine (run by scripts/gpu_check.sh). For each shape ``[out, in]``
and token count T, times ``x @ w.T`` with bf16 activations for:

- ``bf16``: the plain bf16 weight (the baseline; 2 bytes per weight),
- ``xla/<mode>``: `jpaged.layers.linear.dense`'s reference path, the weight
  dequantized inside the jitted function (what XLA fuses, or does not),
- ``pallas/<mode>``: `jpaged.pallas_kernels.quant_matmul` at its default tiles,
  and, at a few T, a small sweep of ``block_n`` (best one reported),
- ``fp8_w8a8``: `linear.fp8_w8a8_dense` (activations rounded to e4m3, fp8 dot),

for the modes int8 (per channel), int4 (group 128, zero point) and fp8 (e4m3,
per channel). Each timed call runs the matmul over ``COPIES`` distinct weight
copies (together larger than the L2 cache) so that no weight stays cached and
launch gaps are amortised; the figure is the median per matmul over
repetitions, with the achieved weight-read bandwidth. Every path's output is
checked against the float32 dequantized reference first (relative error).

Prints one JSON line per measurement and a table last; ``--json`` writes all.
``--smoke`` runs tiny shapes on any backend (the Pallas paths in interpret
mode) to check the script itself. Stops starting new measurements after
``--budget-s`` seconds and prints what it has.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--tokens", default="1,16,64,256,2048")
  ap.add_argument("--sweep-tokens", default="1")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--budget-s", type=float, default=80.0)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from jpaged.layers import linear
  from jpaged.pallas_kernels import quant_matmul as qm

  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.smoke:
    print(f"gpu_bench_quant: no GPU visible to JAX (backend: {jax.default_backend()})",
          file=sys.stderr)
    return 2
  t_start = time.perf_counter()
  interpret = not on_gpu
  if args.smoke:
    shapes = {"tiny": (256, 512)}
    tokens, sweep_tokens, copies, args.reps = [1, 32], [1], 2, 2
  else:
    # [out, in]: gate/up halves (one of the two), down, q+k+v.
    shapes = {"up 14336x4096": (14336, 4096), "down 4096x14336": (4096, 14336),
              "qkv 6144x4096": (6144, 4096)}
    tokens = [int(t) for t in args.tokens.split(",")]
    sweep_tokens = [int(t) for t in args.sweep_tokens.split(",")]
    copies = 8
  rows = []

  def emit(**r):
    rows.append(r)
    print(json.dumps(r), flush=True)

  def time_fn(fn, *a):
    """Median seconds per matmul of ``fn(*a)`` (which runs ``copies`` of them)."""
    jax.block_until_ready(fn(*a))
    ts = []
    for _ in range(args.reps):
      t = time.perf_counter()
      jax.block_until_ready(fn(*a))
      ts.append(time.perf_counter() - t)
    return statistics.median(ts) / copies

  def over_copies(matmul):
    def f(x, ws):
      acc = None
      for w in ws:  # unrolled: distinct weights, nothing loop-invariant to hoist
        y = matmul(x, w).astype(jnp.float32)
        acc = y if acc is None else acc + y
      return acc
    return jax.jit(f)

  quantizers = {"int8": linear.quantize_int8, "int4": lambda w: linear.quantize_int4(w, 128),
                "fp8": linear.quantize_fp8}
  out_of_time = False
  for shape_name, (out, n) in shapes.items():
    if out_of_time:
      break
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((out, n), dtype=np.float32) * 0.02
    # Distinct buffers holding the same values (quantizing on the host is slow).
    dup = lambda tree: [jax.tree.map(lambda a: a.copy(), tree) for _ in range(copies)]  # noqa: E731
    bf16_ws = dup(jnp.asarray(w32, jnp.bfloat16))
    qws = {m: dup(linear.to_device(q(w32))) for m, q in quantizers.items()}
    paths = {"bf16": (lambda x, w: x @ w.T, bf16_ws, 2.0)}
    for m, ws in qws.items():
      bpw = ws[0].nbytes / (out * n)
      paths[f"xla/{m}"] = (_xla, ws, bpw)
      paths[f"pallas/{m}"] = (
          lambda x, w: qm.quant_matmul(x, w, interpret=interpret), ws, bpw)
    paths["fp8_w8a8"] = (linear.fp8_w8a8_dense, qws["fp8"], qws["fp8"][0].nbytes / (out * n))

    # Correctness once per shape (T = 5), against the f32 dequantized reference.
    x5 = jnp.asarray(rng.standard_normal((5, n)), jnp.bfloat16)
    for name, (mm, ws, _) in paths.items():
      ref = (x5.astype(jnp.float32) @ (linear.dequantize(ws[0]) if name != "bf16"
                                       else ws[0].astype(jnp.float32)).T)
      y = jax.jit(mm)(x5, ws[0]).astype(jnp.float32)
      err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
      emit(kind="check", shape=shape_name, path=name, rel_err=err,
           finite=bool(jnp.isfinite(y).all()))

    for t in tokens:
      if time.perf_counter() - t_start > args.budget_s:
        out_of_time = True
        break
      x = jnp.asarray(rng.standard_normal((t, n)), jnp.bfloat16)
      for name, (mm, ws, bpw) in paths.items():
        if time.perf_counter() - t_start > args.budget_s:
          out_of_time = True
          break
        sec = time_fn(over_copies(mm), x, ws)
        emit(kind="time", shape=shape_name, tokens=t, path=name, us=sec * 1e6,
             weight_gb_s=out * n * bpw / sec / 1e9, tflops=2 * t * out * n / sec / 1e12)
      if t in sweep_tokens:
        for m, ws in qws.items():
          # (block_n, num_warps, num_splits); None: the default split.
          for bn, warps, splits in ((32, 4, None), (64, 4, None), (128, 4, None),
                                    (128, 8, None), (32, 4, 1), (64, 4, 4), (128, 4, 8)):
            if out % bn or time.perf_counter() - t_start > args.budget_s:
              continue
            if True:
              f = over_copies(lambda x, w, bn=bn, warps=warps, splits=splits: qm.quant_matmul(
                  x, w, block_n=bn, num_warps=warps, num_splits=splits, interpret=interpret))
              try:
                sec = time_fn(f, x, ws)
              except Exception as e:  # noqa: BLE001 - a config Triton rejects: report it
                emit(kind="sweep", shape=shape_name, tokens=t, path=f"pallas/{m}",
                     block_n=bn, num_warps=warps, num_splits=splits, error=str(e)[:200])
                continue
              emit(kind="sweep", shape=shape_name, tokens=t, path=f"pallas/{m}",
                   block_n=bn, num_warps=warps, num_splits=splits, us=sec * 1e6,
                   weight_gb_s=out * n * ws[0].nbytes / (out * n) / sec / 1e9)
    del bf16_ws, qws, paths

  # Table: per shape and T, microseconds per matmul (weight GB/s).
  times = {(r["shape"], r["tokens"], r["path"]): r for r in rows if r["kind"] == "time"}
  names = list(dict.fromkeys(r["path"] for r in rows if r["kind"] == "time"))
  print("\n| shape | T | " + " | ".join(names) + " |")
  print("|---|---|" + "---|" * len(names))
  for shape_name in shapes:
    for t in tokens:
      cells = [times.get((shape_name, t, p)) for p in names]
      if not any(cells):
        continue
      print(f"| {shape_name} | {t} | " + " | ".join(
          f"{c['us']:.1f} us ({c['weight_gb_s']:.0f} GB/s)" if c else "-" for c in cells) + " |")
  best = {}
  for r in rows:
    if r["kind"] == "sweep" and "us" in r:
      k = (r["shape"], r["tokens"], r["path"])
      if k not in best or r["us"] < best[k]["us"]:
        best[k] = r
  for (s, t, p), r in sorted(best.items()):
    d = times.get((s, t, p))
    print(f"sweep best {s} T={t} {p}: block_n={r['block_n']} num_warps={r['num_warps']} "
          f"num_splits={r['num_splits'] or 'default'} "
          f"{r['us']:.1f} us" + (f" (default tiles {d['us']:.1f} us)" if d else ""))
  bad = [r for r in rows if r["kind"] == "check" and (not r["finite"] or r["rel_err"] > (
      6e-2 if r["path"] == "fp8_w8a8" else 2e-2))]
  for r in bad:
    print(f"CHECK FAILED: {r}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(rows=rows, seconds=time.perf_counter() - t_start), fh, indent=1)
  return 1 if bad else 0


def _xla(x, w):
  """`dense`'s XLA path whatever JPAGED_QUANT_MATMUL says."""
  from jpaged.layers import linear

  w_deq = linear.dequantize_stored(w).astype(x.dtype)
  return x @ w_deq.T


if __name__ == "__main__":
  sys.exit(main())

#!/usr/bin/env python3
"""Times the Pallas paged-attention kernels on a GPU (JAX 0.11.2, H100/H200).

1. Bandwidth ceiling: a large device-to-device elementwise copy (bytes read
   plus written).
2. Decode on Llama-3-8B shapes (32 q heads, 8 KV heads, head_dim 128, bf16,
   block size 16), batch 1/16/64/256 x context 512/2048/8192: jpaged's
   kernel, JAX's bundled ``pallas.ops.gpu.paged_attention`` (its own layout
   ``[kv_heads, pages, page_size, head_dim]``, transposed outside the timed
   region, q pre-scaled since it has no softmax scale) and the jnp reference
   where its gather fits. Reports microseconds, K/V bytes read / time and the
   share of the measured copy bandwidth.
3. Decode tuning sweep at batch 64, context 2048 (the issue's target shape):
   pages per loop iteration x pipelining stages x warps (x splits for the
   best), each config's time and share of copy bandwidth, the defaults'
   config marked, the best printed last; configs that fail to compile (e.g.
   shared memory) are reported, not fatal.
4. Ragged kernel on a prefill-heavy step (and on a decode-only step, to
   compare with the decode kernel).

Timing: each function is jitted as R back-to-back calls chained through q
(one dispatch, no host gaps), warmed up, then the median over repeats.
Exits 2 with one line on stderr when JAX sees no GPU. Writes a JSON copy of
the table to $OUT/bench_kernels.json when $OUT is set.

  usage: python3 scripts/gpu_bench_kernels.py [--quick]  (quick: context 2048 only)
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

WATCHDOG_S = int(os.environ.get("BENCH_TIMEOUT_S", "300"))


def _watchdog(signum, frame):
  print(f"gpu_bench_kernels: timed out after {WATCHDOG_S}s", file=sys.stderr, flush=True)
  os._exit(3)


signal.signal(signal.SIGALRM, _watchdog)
signal.alarm(WATCHDOG_S)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

# JPAGED_BENCH_SMOKE=1: tiny shapes in interpret mode, to check this script on CPU.
SMOKE = os.environ.get("JPAGED_BENCH_SMOKE") == "1"
if jax.default_backend() != "gpu" and not SMOKE:
  print(f"gpu_bench_kernels: no GPU (JAX backend is {jax.default_backend()!r}); "
        "run this on a GPU machine", file=sys.stderr)
  sys.exit(2)

from jpaged.pallas_kernels.attention import common  # noqa: E402
from jpaged.pallas_kernels.attention import decode as decode_mod  # noqa: E402
from jpaged.pallas_kernels.attention.decode import paged_decode_attention  # noqa: E402
from jpaged.pallas_kernels.attention.ragged import ragged_paged_attention  # noqa: E402
from jpaged.pallas_kernels.attention.reference import (  # noqa: E402
    paged_decode_attention_reference, ragged_paged_attention_reference)

try:
  from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged
except Exception as e:  # noqa: BLE001
  jax_paged = None
  print(f"note: bundled paged_attention unavailable: {e}")

QUICK = "--quick" in sys.argv or SMOKE
H, KVH, D, BS = 32, 8, 128, 16
DTYPE = jnp.bfloat16
REPS = 8  # calls chained inside one jitted function
REF_LIMIT = 4e9  # bytes the reference may gather (f32 K and V)


def timed(f, *args, repeats=7):
  """Median seconds per call of ``f(q, *rest)``, chained REPS times per dispatch."""
  def chained(q, *rest):
    def body(_, q):
      o = f(q, *rest)
      return q + (o * 1e-3).astype(q.dtype)  # data dependence, tiny cost
    return lax.fori_loop(0, REPS, body, q, unroll=True)
  g = jax.jit(chained)
  jax.block_until_ready(g(*args))  # compile + warm up
  jax.block_until_ready(g(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(g(*args))
    times.append((time.perf_counter() - t0) / REPS)
  return statistics.median(times)


def copy_bandwidth():
  n = 512 * 1024 * 1024 if not SMOKE else 1024 * 1024
  x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)  # 2 GiB
  f = jax.jit(lambda x: x + 1.0)
  jax.block_until_ready(f(x))
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  moved = 2 * x.size * 4
  del x
  return moved / t, t, moved


def rel_err(a, b):
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def decode_case(batch, ctx, key):
  pages = ctx // BS
  num_blocks = batch * pages + 1
  kq, kk, kv, kp = jax.random.split(key, 4)
  q = jax.random.normal(kq, (batch, H, D), DTYPE)
  k = jax.random.normal(kk, (num_blocks, BS, KVH, D), DTYPE)
  v = jax.random.normal(kv, (num_blocks, BS, KVH, D), DTYPE)
  # Scattered pages, as after a while of serving.
  tables = (jax.random.permutation(kp, num_blocks - 1) + 1).reshape(batch, pages).astype(jnp.int32)
  lens = jnp.full((batch,), ctx, jnp.int32)
  return q, k, v, tables, lens


def bench_decode(bw_copy):
  rows = []
  batches = (1, 16, 64, 256) if not QUICK else (1, 64, 256)
  ctxs = (512, 2048, 8192) if not QUICK else (2048,)
  if SMOKE:
    batches, ctxs = (1, 2), (64,)
  scale = D ** -0.5
  for batch in batches:
    for ctx in ctxs:
      q, k, v, tables, lens = decode_case(batch, ctx, jax.random.key(batch * 7 + ctx))
      kv_bytes = 2 * batch * ctx * KVH * D * jnp.dtype(DTYPE).itemsize
      row = dict(kernel="decode", batch=batch, ctx=ctx, kv_mb=kv_bytes / 1e6)
      ours = lambda q, k, v, t, l: paged_decode_attention(q, k, v, t, l, scale=scale,
                                                          interpret=SMOKE)
      row["ours_us"] = timed(ours, q, k, v, tables, lens) * 1e6
      out = ours(q, k, v, tables, lens)
      if jax_paged is not None:
        kp = jnp.transpose(k, (2, 0, 1, 3))  # [kv_heads, pages, page_size, head_dim]
        vp = jnp.transpose(v, (2, 0, 1, 3))
        splits = math.gcd(16, ctx // BS)  # it needs pages % k_splits == 0
        bundled = lambda q, k, v, t, l: jax_paged.paged_attention(
            q * scale, k, v, t, l, k_splits=splits, interpret=SMOKE)
        try:
          row["jax_us"] = timed(bundled, q, kp, vp, tables, lens) * 1e6
          row["err_vs_jax"] = rel_err(out, bundled(q, kp, vp, tables, lens))
        except Exception as e:  # noqa: BLE001
          row["jax_us"] = None
          print(f"bundled paged_attention failed at batch {batch} ctx {ctx}: "
                f"{type(e).__name__}: {str(e)[:200]}")
        del kp, vp
      if 2 * batch * ctx * KVH * D * 4 <= REF_LIMIT:
        ref = lambda q, k, v, t, l: paged_decode_attention_reference(q, k, v, t, l, scale=scale)
        row["ref_us"] = timed(ref, q, k, v, tables, lens, repeats=3) * 1e6
        row["err_vs_ref"] = rel_err(out, ref(q, k, v, tables, lens))
      row["ours_gbs"] = kv_bytes / (row["ours_us"] * 1e-6) / 1e9
      row["ours_pct_copy"] = 100 * row["ours_gbs"] * 1e9 / bw_copy
      rows.append(row)
      print(json.dumps(row), flush=True)
      del q, k, v, tables, lens, out
  return rows


def sweep_decode(bw_copy, batch=64, ctx=2048):
  """Times the decode kernel over its tuning knobs at one shape."""
  if SMOKE:
    batch, ctx = 2, 64
  q, k, v, tables, lens = decode_case(batch, ctx, jax.random.key(11))
  kv_bytes = 2 * batch * ctx * KVH * D * jnp.dtype(DTYPE).itemsize
  scale = D ** -0.5
  pages0, splits0 = decode_mod.default_decode_params(batch, KVH, BS, ctx // BS, D,
                                                     jnp.dtype(DTYPE).itemsize)
  stages0 = common.default_num_stages(pages0 * BS * D * jnp.dtype(DTYPE).itemsize)
  default = (pages0, stages0, 4, splits0)
  ref = paged_decode_attention_reference(q, k, v, tables, lens, scale=scale)
  configs = [(p, st, w, splits0) for p in (2, 4, 8, 16) for st in (2, 3, 4) for w in (4, 8)
             # Triton keeps stages - 1 K and V buffers; an H100 block has 227 KiB.
             if (st - 1) * 2 * p * BS * D * jnp.dtype(DTYPE).itemsize <= 200 * 1024]
  if SMOKE:
    configs = [(2, 2, 4, 1), (4, 3, 4, 1)]
  if default not in configs:
    configs.insert(0, default)
  rows = []

  def run(p, st, w, sp):
    f = lambda q, k, v, t, l: paged_decode_attention(
        q, k, v, t, l, scale=scale, pages_per_compute_block=p, num_stages=st, num_warps=w,
        num_splits=sp, interpret=SMOKE)
    row = dict(pages=p, stages=st, warps=w, splits=sp, default=(p, st, w, sp) == default)
    try:
      row["err_vs_ref"] = rel_err(f(q, k, v, tables, lens), ref)
      row["us"] = timed(f, q, k, v, tables, lens) * 1e6
      row["pct_copy"] = 100 * kv_bytes / (row["us"] * 1e-6) / bw_copy
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
      row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    rows.append(row)
    print(json.dumps(row), flush=True)

  for cfg in configs:
    run(*cfg)
  ok = [r for r in rows if "us" in r]
  if ok:  # the best config again with split-K, which more programs may help
    b = min(ok, key=lambda r: r["us"])
    for sp in (2, 4) if not SMOKE else (2,):
      run(b["pages"], b["stages"], b["warps"], sp)
  del q, k, v, tables, lens, ref
  return dict(batch=batch, ctx=ctx, kv_mb=kv_bytes / 1e6, rows=rows)


def ragged_case(q_lens, ctx_lens, key):
  pages = [math.ceil(c / BS) for c in ctx_lens]
  max_blocks = max(pages)
  num_blocks = sum(pages) + 1
  kq, kk, kv, kp = jax.random.split(key, 4)
  num_tokens = 1 << max(sum(q_lens) - 1, 1).bit_length()  # power-of-two bucket
  q = jax.random.normal(kq, (num_tokens, H, D), DTYPE)
  k = jax.random.normal(kk, (num_blocks, BS, KVH, D), DTYPE)
  v = jax.random.normal(kv, (num_blocks, BS, KVH, D), DTYPE)
  perm = jax.random.permutation(kp, num_blocks - 1) + 1
  tables, off = [], 0
  for p in pages:
    row = jnp.zeros((max_blocks,), jnp.int32).at[:p].set(perm[off:off + p].astype(jnp.int32))
    tables.append(row)
    off += p
  qsl = jnp.asarray([0] + list(jnp.cumsum(jnp.asarray(q_lens)).tolist()), jnp.int32)
  return q, k, v, jnp.stack(tables), jnp.asarray(ctx_lens, jnp.int32), qsl


def bench_ragged(bw_copy):
  rows = []
  scale = D ** -0.5
  cases = [
      ("prefill 4x2048 on 2048 cached", [2048] * 4, [4096] * 4),
      ("prefill 1x8192 from scratch", [8192], [8192]),
      ("decode-only 64 x ctx 2048", [1] * 64, [2048] * 64),
  ]
  if QUICK:
    cases = cases[:1]
  if SMOKE:
    cases = [("smoke prefill 2x24 on 40", [24, 24], [64, 64])]
  for name, q_lens, ctx_lens in cases:
    q, k, v, tables, lens, qsl = ragged_case(q_lens, ctx_lens, jax.random.key(len(name)))
    f = lambda q, k, v, t, l, s: ragged_paged_attention(q, k, v, t, l, s, scale=scale,
                                                        interpret=SMOKE)
    t = timed(f, q, k, v, tables, lens, qsl)
    # Causal flops: each query token attends to (ctx - q_len + i + 1) keys.
    keys = sum(ql * (c - ql) + ql * (ql + 1) / 2 for ql, c in zip(q_lens, ctx_lens))
    flops = 4 * keys * H * D
    kv_bytes = 2 * sum(ctx_lens) * KVH * D * jnp.dtype(DTYPE).itemsize
    row = dict(kernel="ragged", case=name, tokens=int(q.shape[0]), ours_us=t * 1e6,
               tflops=flops / t / 1e12, ours_gbs=kv_bytes / t / 1e9,
               ours_pct_copy=100 * kv_bytes / t / bw_copy)
    if 2 * q.shape[0] * max(ctx_lens) * KVH * D * 4 <= REF_LIMIT:
      out = f(q, k, v, tables, lens, qsl)
      row["err_vs_ref"] = rel_err(out, ragged_paged_attention_reference(
          q, k, v, tables, lens, qsl, scale=scale))
    rows.append(row)
    print(json.dumps(row), flush=True)
    del q, k, v, tables, lens, qsl
  return rows


def fmt(x, spec):
  return format(x, spec) if isinstance(x, (int, float)) else "-"


def main():
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}; jax {jax.__version__}", flush=True)
  bw, t, moved = copy_bandwidth()
  print(f"copy: {moved / 2**30:.3g} GiB moved (read + written) in {t * 1e3:.2f} ms = {bw / 1e9:.0f} GB/s",
        flush=True)
  decode_rows = bench_decode(bw)
  sweep = sweep_decode(bw)
  ragged_rows = bench_ragged(bw)

  lines = [f"device {dev.device_kind}, jax {jax.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s",
           "decode (Llama-3-8B: 32q/8kv heads, d128, bf16, bs16); us per call",
           f"{'batch':>5} {'ctx':>5} {'KV MB':>8} {'ours':>8} {'jax':>8} {'ref':>9} "
           f"{'GB/s':>6} {'%copy':>5} {'jax/ours':>8} {'err':>8}"]
  for r in decode_rows:
    speedup = r["jax_us"] / r["ours_us"] if r.get("jax_us") else None
    err = r.get("err_vs_ref", r.get("err_vs_jax"))
    lines.append(f"{r['batch']:>5} {r['ctx']:>5} {r['kv_mb']:>8.1f} {r['ours_us']:>8.1f} "
                 f"{fmt(r.get('jax_us'), '8.1f'):>8} {fmt(r.get('ref_us'), '9.1f'):>9} "
                 f"{r['ours_gbs']:>6.0f} {r['ours_pct_copy']:>5.0f} {fmt(speedup, '8.2f'):>8} "
                 f"{fmt(err, '8.1e'):>8}")
  lines.append(f"decode sweep at batch {sweep['batch']}, ctx {sweep['ctx']} "
               f"({sweep['kv_mb']:.0f} MB of K/V); * = the defaults' config")
  lines.append(f"  {'pages':>5} {'stages':>6} {'warps':>5} {'splits':>6} {'us':>8} {'%copy':>5} "
               f"{'err':>8}")
  for r in sweep["rows"]:
    if "error" in r:
      lines.append(f"  {r['pages']:>5} {r['stages']:>6} {r['warps']:>5} {r['splits']:>6} "
                   f"FAILED {r['error'][:60]}")
      continue
    lines.append(f"{'*' if r['default'] else ' '} {r['pages']:>5} {r['stages']:>6} "
                 f"{r['warps']:>5} {r['splits']:>6} {r['us']:>8.1f} {r['pct_copy']:>5.0f} "
                 f"{r['err_vs_ref']:>8.1e}")
  ok = [r for r in sweep["rows"] if "us" in r]
  if ok:
    b = min(ok, key=lambda r: r["us"])
    d = next((r for r in ok if r["default"]), None)
    lines.append(f"  best: pages_per_compute_block={b['pages']} num_stages={b['stages']} "
                 f"num_warps={b['warps']} num_splits={b['splits']}: {b['us']:.1f} us, "
                 f"{b['pct_copy']:.0f}% of copy"
                 + (f" (defaults {d['us']:.1f} us, {d['pct_copy']:.0f}%)" if d else ""))
  lines.append("ragged")
  for r in ragged_rows:
    lines.append(f"  {r['case']:<30} T={r['tokens']:<5} {r['ours_us']:>9.1f} us "
                 f"{r['tflops']:>6.1f} TFLOP/s {r['ours_gbs']:>6.0f} GB/s "
                 f"({r['ours_pct_copy']:.0f}% copy) err {fmt(r.get('err_vs_ref'), '.1e')}")
  table = "\n".join(lines)
  print("\n" + table)
  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, "bench_kernels.json"), "w") as fh:
      json.dump(dict(copy_gbs=bw / 1e9, decode=decode_rows, decode_sweep=sweep,
                     ragged=ragged_rows), fh, indent=1)
    with open(os.path.join(out, "bench_kernels_table.txt"), "w") as fh:
      fh.write(table + "\n")
  signal.alarm(0)


if __name__ == "__main__":
  main()

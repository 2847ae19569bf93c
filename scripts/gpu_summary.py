#!/usr/bin/env python3
"""Builds the one summary table of a scripts/gpu_check.sh run from its folder.

Reads what the stages left in the run folder: ``stages.tsv`` (name, status,
seconds), ``env.txt``, ``test_kernels.log`` (the pytest summary line),
``bench_kernels.json`` (decode at batch 64 / context 2048 against copy
bandwidth and JAX's bundled kernel, the tuning sweep's best and the
defaults' config), ``bench_engine.json`` (steady-state steps, throughput)
and the ``AB {json}`` lines of ``ab_*.log`` (XLA-flag arms of the decode
step). Missing pieces print as ``-``: a stage that failed or was skipped
still leaves a table.

  usage: python3 scripts/gpu_summary.py RUN_DIR
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys


def _read(path):
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _json(path):
    text = _read(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _f(x, spec=".2f", suffix=""):
    return f"{x:{spec}}{suffix}" if isinstance(x, (int, float)) else "-"


def summary(run: str) -> str:
    out = [f"== gpu_check summary: {(_read(os.path.join(run, 'env.txt')) or '?').splitlines()[0]} =="]
    out.append(f"{'stage':<28} {'status':<12} {'seconds':>7}")
    for line in (_read(os.path.join(run, "stages.tsv")) or "").splitlines():
        name, status, secs = (line.split("\t") + ["", "", ""])[:3]
        out.append(f"{name:<28} {status:<12} {secs:>7}")
    tests = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|error).*?)\s*=*$",
                       _read(os.path.join(run, "test_kernels.log")) or "", re.M)
    out.append(f"kernel tests on the GPU: {tests[-1] if tests else 'no pytest summary'}")

    k = _json(os.path.join(run, "bench_kernels.json"))
    if k:
        out.append(f"copy bandwidth: {k['copy_gbs']:.0f} GB/s")
        for r in k.get("decode", []):
            if r["ctx"] == 2048:
                jax_x = r["jax_us"] / r["ours_us"] if r.get("jax_us") else None
                out.append(f"decode b{r['batch']:<3} ctx 2048: {r['ours_us']:8.1f} us "
                           f"{r['ours_pct_copy']:3.0f}% of copy; JAX bundled / ours "
                           f"{_f(jax_x)}; err {_f(r.get('err_vs_ref', r.get('err_vs_jax')), '.1e')}")
        ok = [r for r in (k.get("decode_sweep") or {}).get("rows", []) if "us" in r]
        if ok:
            b = min(ok, key=lambda r: r["us"])
            d = next((r for r in ok if r["default"]), None)
            failed = sum("error" in r for r in k["decode_sweep"]["rows"])
            out.append(f"decode sweep best: pages {b['pages']} stages {b['stages']} warps "
                       f"{b['warps']} splits {b['splits']}: {b['pct_copy']:.0f}% of copy; "
                       f"defaults {_f(d and d['pct_copy'], '.0f', '%')}; "
                       f"{failed} configs failed")
        for r in k.get("ragged", []):
            out.append(f"ragged {r['case']}: {r['ours_us']:.0f} us, {r['tflops']:.0f} TFLOP/s")

    e = _json(os.path.join(run, "bench_engine.json"))
    if e:
        out.append(f"engine steady state (weights-read floor {_f(e['floor_ms'])} ms/step):")
        out.append(f"  {'async':<5} {'batch':>5} {'device ms':>9} {'wall ms':>8} {'tok/s':>8}")
        for r in e["steady"]:
            out.append(f"  {'on' if r['async'] else 'off':<5} {r['batch']:>5} "
                       f"{_f(r['device_ms']):>9} {r['wall_ms']:>8.2f} {r['tok_s']:>8.0f}")
        for n in e.get("notes", []):
            out.append(f"  note: {n}")
        t = e.get("throughput")
        if t:
            out.append(f"  throughput: {t['tok_s']:.0f} output tok/s ({t['requests']} requests, "
                       f"{t['compiles']} compiles in the timed pass)")

    # The quantized-matmul and quantized-engine tables, as their scripts print them.
    for log, title in (("bench_quant.log", "quantized matmuls, us per matmul (weight GB/s):"),
                       ("bench_quant_engine.log", "engine with quantized weights (4 layers):")):
        lines = [ln for ln in (_read(os.path.join(run, log)) or "").splitlines()
                 if ln.startswith(("| ", "sweep best", "CHECK FAILED", "copy bandwidth"))]
        if lines:
            out.append(title)
            out.extend("  " + ln for ln in lines)

    arms = []
    for path in sorted(glob.glob(os.path.join(run, "ab_*.log"))):
        lines = [ln for ln in (_read(path) or "").splitlines() if ln.startswith("AB ")]
        arm = os.path.basename(path)[3:-4]
        arms.append(json.loads(lines[-1][3:]) if lines else dict(name=arm))
    if arms:
        base = next((a for a in arms if a["name"] == "default" and "wall_ms" in a), None)
        out.append("decode step at batch 64 under XLA flags (each its own process):")
        for a in arms:
            rel = (a["wall_ms"] / base["wall_ms"]) if base and "wall_ms" in a else None
            out.append(f"  {a['name']:<16} wall {_f(a.get('wall_ms')):>7} ms  device "
                       f"{_f(a.get('device_ms')):>7} ms  vs default {_f(rel)}"
                       + ("" if "wall_ms" in a else "  (no result: see its log)"))
            if a.get("command_buffers"):
                out.append(f"    command buffers: {a['command_buffers']}")
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(sys.argv[1]))

#!/usr/bin/env python3
"""Compiles the Pallas kernels for an H100 without a GPU and reports resources.

Lowers ``paged_decode_attention`` / ``ragged_paged_attention`` for an abstract
H100 (as tests/test_kernel_lowering.py does), hands the captured Triton IR to
the ``triton`` package's own compiler for sm_90 at the requested warps and
pipeline stages, and prints per config: shared memory, the asynchronous copies
and their buffer depth in the pipelined loop, plain tensor loads left in the
loop, and (when a ``ptxas`` that accepts the PTX is found) registers and spill
bytes. XLA compiles the same IR with its own pinned Triton, so the figures are
a close guide, not the GPU's word: use them to rule out configs that cannot
fit (shared memory over 227 KiB) before a GPU run, and to see whether a change
made the K/V loads pipeline.

Needs ``pip install triton`` (not a jpaged dependency); runs on CPU.
  usage: python3 scripts/gpu_triton_report.py [--kernel decode|ragged]
         [--pages 2,4,8,16] [--stages 2,3,4] [--warps 4]
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def triton_ir(kernel: str, pages: int, dtype: str = "bfloat16") -> str:
    import jax
    import jax.numpy as jnp
    import test_kernel_lowering as tkl

    from jpaged.pallas_kernels.attention import decode, ragged

    sds, dt = jax.ShapeDtypeStruct, jnp.dtype(dtype)
    cache = tkl.cache_args(8193, 16, 8, 128, dt)
    if kernel == "decode":  # batch 64 at context 2048, Llama-3-8B heads
        args = (sds((64, 32, 128), dt), *cache, sds((64, 128), jnp.int32),
                sds((64,), jnp.int32))
        f = functools.partial(decode.paged_decode_attention, scale=0.1,
                              pages_per_compute_block=pages)
    else:  # a 2048-token prefill step over 64 sequences
        args = (sds((2048, 32, 128), dt), *cache, sds((64, 256), jnp.int32),
                sds((64,), jnp.int32), sds((65,), jnp.int32))
        f = functools.partial(ragged.ragged_paged_attention, scale=0.1,
                              pages_per_compute_block=pages)
    modules = []
    tkl.lower_for_h100(f, *args, modules_out=modules)
    return modules[0]


def find_ptxas():
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    return [p for p in (bundled, shutil.which("ptxas")) if p and os.path.exists(p)]


def ptxas_report(ptx: str) -> str:
    """Registers and spills from the first ptxas that accepts the PTX version."""
    with tempfile.TemporaryDirectory() as d:
        for ptxas in find_ptxas():
            r = subprocess.run([ptxas, "--version"], capture_output=True, text=True)
            m = re.search(r"release (\d+)\.(\d+)", r.stdout)
            text = ptx
            if m:  # the newest PTX ISA this ptxas reads: CUDA 12.x -> 8.x, 13.x -> 9.x
                text = re.sub(r"^\.version \d+\.\d+", f".version {int(m[1]) - 4}.0", ptx,
                              flags=re.M)
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as fh:
                fh.write(text)
            r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o",
                                os.path.join(d, "k.cubin")], capture_output=True, text=True)
            if r.returncode == 0:
                regs = re.search(r"Used (\d+) registers", r.stderr)
                spill = re.search(r"(\d+) bytes spill stores", r.stderr)
                return f"{regs[1] if regs else '?'} regs, {spill[1] if spill else '?'} B spilled"
    return "registers: no ptxas accepted the PTX"


def report(ir: str, warps: int, stages: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ttir")
        with open(path, "w") as fh:
            fh.write(ir)
        try:
            k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=stages))
        except Exception as e:  # noqa: BLE001 - a config that fails is a result
            return f"FAILED {type(e).__name__}: {str(e)[:120]}"
    ttgir = k.asm["ttgir"]
    loop = ttgir[ttgir.find("scf.for"):]
    copies = len(re.findall(r"async_copy_global_to_local", loop))
    depth = sorted(set(re.findall(r"memdesc<(\d+)x\d+x\d+x\w+, #shared\d*, #smem, mutable",
                                  ttgir)))
    plain = len(re.findall(r"tt\.load %\S+, %\S+, %\S+ : tensor<\d+x\d+x", loop))
    return (f"shared {k.metadata.shared / 1024:.0f} KiB; {copies} async copies in the loop, "
            f"buffers {'/'.join(depth) or '-'}; {plain} plain 2-D tile loads in the loop; "
            f"{ptxas_report(k.asm['ptx'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("decode", "ragged"), default="decode")
    ap.add_argument("--pages", default="2,4,8,16")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--warps", default="4")
    args = ap.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_triton_report: needs the triton package (pip install triton)",
              file=sys.stderr)
        return 2
    for pages in map(int, args.pages.split(",")):
        ir = triton_ir(args.kernel, pages)
        for warps in map(int, args.warps.split(",")):
            for stages in map(int, args.stages.split(",")):
                print(f"{args.kernel} pages {pages:>2} warps {warps} stages {stages}: "
                      f"{report(ir, warps, stages)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

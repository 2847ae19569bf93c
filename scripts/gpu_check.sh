#!/usr/bin/env bash
# GPU check, one call on a lent GPU machine (JAX 0.11.2 there), under 8 minutes:
#   1. the Pallas kernel tests ON the GPU (JPAGED_TEST_PLATFORM=cuda: the GPU
#      class fails, not skips, if JAX sees no GPU)
#      (attention kernels and the quantized-weight matmul)
#   2. scripts/gpu_bench_quant.py: quantized matmuls on 8B projection shapes,
#      XLA's fused dequantize against the Pallas kernel and fp8 W8A8
#   3. scripts/gpu_bench_engine.py --quant-modes: the 8B-shaped engine (4
#      layers) with bf16, int8 and int4 weights, each matmul path
#   4. scripts/gpu_bench_kernels.py --quick: copy bandwidth, decode against
#      JAX's bundled kernel and the reference, the decode tuning sweep, ragged
#   5. scripts/gpu_bench_engine.py: steady-state decode at batch 1/64/256 with
#      async scheduling on and off, and ShareGPT-like throughput (8B shapes)
#   6. A/B arms of the batch-64 decode step under XLA flags, each in its own
#      process: default (with an HLO dump: command-buffer coverage), command
#      buffers off, Triton GEMM off, autotuning off
# Each stage has its own time limit and is skipped if it would overrun the
# overall budget; one summary table prints last and is written, with a tarball
# of every log, to $OUT when set (the device tool brings back 8 files at most).
# Exits 2 at once, with one line, when JAX sees no GPU; else 1 if a stage
# failed or timed out.
#   usage: bash scripts/gpu_check.sh [all|quant|engine]   (default all;
#          quant = stages 1-3, engine = stages 4-6; PYTHON=... picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PART="${1:-all}"
case "$PART" in all|quant|engine) ;; *) echo "gpu_check: unknown part '$PART' (all, quant or engine)" >&2; exit 2;; esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"

backend=$(timeout 120 "$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -1)
if [ "$backend" != "gpu" ]; then
  echo "gpu_check: no GPU visible to JAX (backend: ${backend:-unavailable}); nothing run" >&2
  exit 2
fi
RUN=$(mktemp -d /tmp/gpu_check.XXXXXX)
"$PY" - > "$RUN/env.txt" <<'EOF' || { cat "$RUN/env.txt"; echo "gpu_check: JAX's devices are not CUDA GPUs" >&2; exit 1; }
import sys, jax
devs = jax.devices()
version = getattr(devs[0].client, "platform_version", "?")
print(f"python {sys.version.split()[0]}, jax {jax.__version__}, {devs[0].device_kind} ({version})")
print("jax.devices():", devs)
sys.exit(0 if devs[0].platform == "gpu" and "rocm" not in version.lower() else 1)
EOF
cat "$RUN/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem \
  --format=csv,noheader >> "$RUN/env.txt" 2>&1

: > "$RUN/stages.tsv"
failed=0
step() {  # step NAME LIMIT_S LOG CMD...
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((BUDGET_S - SECONDS)) t0=$SECONDS rc status
  if [ "$left" -lt 25 ]; then
    printf '%s\tSKIPPED(time)\t0\n' "$name" >> "$RUN/stages.tsv"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s) ==="
  timeout -k 10 "$limit" "$@" > "$RUN/$log" 2>&1
  rc=$?
  tail -n 32 "$RUN/$log"
  if [ "$rc" -eq 0 ]; then status=ok
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; failed=1
  else status="FAIL(rc=$rc)"; failed=1
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$RUN/stages.tsv"
}

export PYTHONUNBUFFERED=1
if [ "$PART" != engine ]; then
# Compiles dominate: 8 pytest workers (pytest-xdist, where installed) sharing
# the GPU without preallocation; failures are written as they happen.
XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")
step "kernel tests (GPU)" 170 test_kernels.log env JPAGED_TEST_PLATFORM=cuda \
  XLA_PYTHON_CLIENT_PREALLOCATE=false JPAGED_TEST_INSTAFAIL="$RUN/test_failures.txt" \
  "$PY" -m pytest -q -p no:cacheprovider $XDIST tests/test_kernels.py \
  tests/test_quant_matmul.py -k "not Interpret" --tb=short -rf -W ignore::Warning
step "quant matmul bench" 100 bench_quant.log \
  "$PY" scripts/gpu_bench_quant.py --budget-s 75 --json "$RUN/bench_quant.json"
step "quant engine bench" 110 bench_quant_engine.log \
  "$PY" scripts/gpu_bench_engine.py --layers 4 --batches 1,16 \
  --quant-modes none,int8:xla,int8:pallas,int4:xla,int4:pallas \
  --json "$RUN/bench_quant_engine.json"
fi
if [ "$PART" != quant ]; then
step "kernel bench" 80 bench_kernels.log env OUT="$RUN" BENCH_TIMEOUT_S=75 \
  "$PY" scripts/gpu_bench_kernels.py --quick
step "engine bench" 110 bench_engine.log \
  "$PY" scripts/gpu_bench_engine.py --json "$RUN/bench_engine.json"
# XLA flag names as in jax 0.11.2's XLA; an unknown flag aborts that arm only.
ab() {  # ab NAME XLA_FLAGS [extra args]
  local name=$1 flags=$2; shift 2
  step "A/B $name" 45 "ab_$name.log" env XLA_FLAGS="$flags" \
    "$PY" scripts/gpu_bench_engine.py --ab "$name" "$@"
}
ab default "" --dump-hlo "$RUN/hlo"
ab no_cmd_buffers "--xla_gpu_enable_command_buffer="
ab no_triton_gemm "--xla_gpu_enable_triton_gemm=false"
ab autotune_0 "--xla_gpu_autotune_level=0"
fi

echo
"$PY" scripts/gpu_summary.py "$RUN" | tee "$RUN/summary.txt"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$RUN/summary.txt" "$OUT/gpu_check_summary.txt"
  [ -f "$RUN/bench_kernels.json" ] && cp "$RUN/bench_kernels.json" "$OUT/"
  for f in bench_engine.json bench_quant.json bench_quant_engine.json test_failures.txt; do
    [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"
  done
  tar -C "$RUN" --exclude=hlo -czf "$OUT/gpu_check_logs.tar.gz" .
fi
echo "logs: $RUN${OUT:+ (copied to $OUT)}"
exit $failed

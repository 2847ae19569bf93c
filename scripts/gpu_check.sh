#!/usr/bin/env bash
# GPU check, one call on a lent GPU machine (JAX 0.11.2 there), under 8 minutes:
#   1. the Pallas kernel tests un-interpreted (tests/test_kernels.py, GPU class)
#   2. scripts/gpu_bench_kernels.py (copy bandwidth, decode vs JAX's bundled
#      kernel and the reference, ragged prefill)
#   3. scripts/gpu_bench_engine.py, if it exists
# and prints a summary table last. Logs go to $OUT (or a temp folder).
# Exits 2 at once, with one line, when JAX sees no GPU; otherwise non-zero if
# any step failed.
#   usage: bash scripts/gpu_check.sh        (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT"

backend=$(timeout 120 "$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -1)
if [ "$backend" != "gpu" ]; then
  echo "gpu_check: no GPU visible to JAX (backend: ${backend:-unavailable}); nothing run" >&2
  exit 2
fi
"$PY" -c 'import jax, sys; d = jax.devices()[0]; print(f"python {sys.version.split()[0]}, jax {jax.__version__}, {d.device_kind}")' \
  | tee "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader >> "$OUT/env.txt" 2>&1

names=(); statuses=(); secs=(); failed=0
step() {  # step NAME TIMEOUT_S LOG CMD...
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s) ==="
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  rc=${PIPESTATUS[0]}
  names+=("$name"); secs+=($((SECONDS - t0)))
  if [ "$rc" -eq 0 ]; then statuses+=("ok")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then statuses+=("TIMEOUT"); failed=1
  else statuses+=("FAIL rc=$rc"); failed=1
  fi
}

step "kernel tests (GPU)" 180 test_kernels.log \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not Interpret"
step "kernel bench" 180 bench_kernels.log env OUT="$OUT" BENCH_TIMEOUT_S=170 "$PY" scripts/gpu_bench_kernels.py
if [ -f scripts/gpu_bench_engine.py ]; then
  step "engine bench" 120 bench_engine.log env OUT="$OUT" "$PY" scripts/gpu_bench_engine.py
fi

echo
[ -f "$OUT/bench_kernels_table.txt" ] && cat "$OUT/bench_kernels_table.txt" && echo
echo "== gpu_check summary ($(head -1 "$OUT/env.txt")) =="
tests_line=$(grep -E "[0-9]+ (passed|failed|skipped|errors?)" "$OUT/test_kernels.log" | tail -1)
printf '%-22s %-12s %6s\n' step status seconds
for i in "${!names[@]}"; do
  printf '%-22s %-12s %6s\n' "${names[$i]}" "${statuses[$i]}" "${secs[$i]}"
done
echo "tests: ${tests_line:-no pytest summary}"
echo "logs: $OUT"
exit $failed

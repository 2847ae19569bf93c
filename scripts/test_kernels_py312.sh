#!/usr/bin/env bash
# Run the Pallas kernel tests under Python 3.12 + jax 0.11.2 (the GPU machines'
# versions) in a venv at .venv312, created on first use and reused after.
#   usage: scripts/test_kernels_py312.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
JAX_VERSION="${JAX_VERSION:-0.11.2}"
VENV=.venv312

find_python() {
  for c in python3.12 /root/.pyenv/versions/3.12.1/bin/python3.12; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  if PYENV_VERSION=3.12.1 python3.12 -c '' 2>/dev/null; then
    echo "env PYENV_VERSION=3.12.1 python3.12"; return 0
  fi
  return 1
}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import jax, sys; assert jax.__version__ == '$JAX_VERSION'" 2>/dev/null; then
  PY=$(find_python) || { echo "test_kernels_py312: no python3.12 found" >&2; exit 2; }
  echo "creating $VENV with $PY and jax==$JAX_VERSION" >&2
  rm -rf "$VENV"
  $PY -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" numpy pytest hypothesis
fi
# jpaged itself, without its heavy dependencies (torch, transformers, flax...).
# (Checked from outside the repo root, where the cwd would hide a missing install.)
if ! (cd / && "$OLDPWD/$VENV/bin/python" -c 'import jpaged.pallas_kernels') 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --no-deps -e . \
    || echo "$PWD" > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/jpaged-src.pth"
fi
"$VENV/bin/python" -c 'import jax; print("python", __import__("sys").version.split()[0], "jax", jax.__version__)'
exec "$VENV/bin/python" -m pytest -q tests/test_kernels.py tests/test_kernel_lowering.py tests/test_quant_matmul.py \
  tests/test_cpu_kernels.py "$@"

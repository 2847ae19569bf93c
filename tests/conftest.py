"""Test session setup: CPU JAX with fake devices, and tiny offline checkpoints."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

_MODELS = {}


def tiny_model(tmp_path_factory, name: str, **kwargs) -> str:
    """Build (once per session) and return a tiny checkpoint directory."""
    from jpaged.tiny import make_tiny_model

    if name not in _MODELS:
        path = str(tmp_path_factory.mktemp(name))
        _MODELS[name] = make_tiny_model(path, **kwargs)
    return _MODELS[name]


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory, "llama", arch="llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory, "qwen2", arch="qwen2")


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory, "mistral", arch="mistral", num_attention_heads=8,
                      num_key_value_heads=2)

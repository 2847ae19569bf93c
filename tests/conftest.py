"""Test session setup: CPU JAX with fake devices by default, an explicit
platform when asked, and tiny offline checkpoints.

CPU is the default so that the suite runs the same everywhere. An explicit
platform passes through: ``JPAGED_TEST_PLATFORM=cuda`` (or a ``JAX_PLATFORMS``
already set in the environment) selects it, and then the GPU-only tests
*require* it: ``gpu_requested()`` tells them to fail, not skip, when JAX does
not see a GPU (a GPU run that silently tested nothing once reported green).
"""

import os

_GPU_PLATFORMS = {"cuda", "gpu", "rocm"}

_platform = os.environ.get("JPAGED_TEST_PLATFORM", "").strip().lower()
if _platform:
    os.environ["JAX_PLATFORMS"] = _platform
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines freeze the heap after a full collection (engine/llm_engine.freeze_heap),
# 0.4-1.5 s each in a process that builds hundreds: tests/test_engine.py checks it.
os.environ.setdefault("JPAGED_GC_FREEZE", "0")

import pytest  # noqa: E402


def pytest_runtest_logreport(report):
    """``JPAGED_TEST_INSTAFAIL=<file>`` (or ``=1``, stderr): write each failure's
    traceback when it happens, not at the end of the session, so that a run
    cut short by a time limit (a lent GPU's lease) still says why it failed."""
    dest = os.environ.get("JPAGED_TEST_INSTAFAIL", "")
    if not dest or not report.failed:
        return
    text = f"\n=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n"
    if dest == "1":
        import sys

        sys.stderr.write(text)
        sys.stderr.flush()
    else:
        with open(dest, "a") as fh:
            fh.write(text)


def gpu_requested() -> bool:
    """True when this session was explicitly asked to run on a GPU platform."""
    return bool(_GPU_PLATFORMS & set(os.environ["JAX_PLATFORMS"].lower().split(",")))


def require_gpu_or_skip(what: str) -> None:
    """Skips ``what`` without a GPU, unless a GPU was asked for: then fails."""
    import jax

    try:
        backend, devices = jax.default_backend(), jax.devices()
    except Exception as e:  # noqa: BLE001 - the requested platform failed to initialise
        # (RuntimeError on first use; jax 0.10 raises AssertionError after that)
        backend, devices = None, f"none ({type(e).__name__} {str(e)[:200]})".replace(" )", ")")
    if backend == "gpu":
        return
    if gpu_requested():
        pytest.fail(f"{what}: asked to run on a GPU (JAX_PLATFORMS="
                    f"{os.environ['JAX_PLATFORMS']}) but JAX sees no GPU; devices: {devices}",
                    pytrace=False)
    pytest.skip(f"{what} need a GPU (set JPAGED_TEST_PLATFORM=cuda on a GPU machine)")


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

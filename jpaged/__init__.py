"""jpaged: a JAX/Pallas LLM inference and serving engine with PagedAttention.

The public API is small: `LLM` and `SamplingParams` for offline generation,
`LLMEngine` for research code that drives steps itself, and `AsyncLLM` for
servers. Names are imported lazily so that light modules (the Pallas kernels,
the block pool) import without the model stack.
"""

__version__ = "0.1.0"

_LAZY = {
    "LLM": "jpaged.engine.llm",
    "LLMEngine": "jpaged.engine.llm_engine",
    "AsyncLLM": "jpaged.engine.async_llm",
    "SamplingParams": "jpaged.sampling_params",
    "RequestOutput": "jpaged.outputs",
    "CompletionOutput": "jpaged.outputs",
    "BeamSearchParams": "jpaged.sampling_params",
    "BeamSearchOutput": "jpaged.outputs",
    "BeamSearchSequence": "jpaged.outputs",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jpaged' has no attribute {name!r}")

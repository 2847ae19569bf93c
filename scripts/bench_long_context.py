#!/usr/bin/env python3
"""Long-context timing: prefill tokens/s and decode step time at 4k, 32k and
100k tokens of prompt, with peak KV blocks in use and host RSS.

One request at a time, chunked prefill (``--max-num-batched-tokens`` a step),
a KV cache of exactly the blocks the longest prompt needs (plus the null
block), greedy decoding of ``--decode-steps`` tokens. Prefill time is from
``add_request`` to the first token (every chunk run; the first token is
sampled by the last chunk); decode step time is the mean wall time of the
steps after it. A warm-up request of ``--max-num-batched-tokens`` + 1
tokens runs first, untimed: it compiles the full chunk, a partial chunk and
the decode step, so no timed figure includes a compile.

On the CPU (default) it builds a tiny Llama (hidden 64, 2 layers, the test
suite's shape) with ``max_position_embeddings`` 131072. ``--gpu-8b`` runs a
Llama-3-8B-shaped ``dummy`` checkpoint (bf16, random weights on the device)
at 100k tokens instead, on the Pallas backend; it exits 2 when JAX sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time


def run_one(engine, n: int, decode_steps: int, SamplingParams, rid: str) -> dict:
    import numpy as np

    p = np.random.default_rng(n).integers(3, 1000, n).tolist()
    kv = engine.kv
    sp = SamplingParams(temperature=0, max_tokens=decode_steps + 1, ignore_eos=True)
    t0 = time.perf_counter()
    engine.add_request(rid, p, sp)
    peak = 0
    first = None
    step_times = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        peak = max(peak, kv.num_blocks - 1 - kv.num_free_blocks)
        if first is None:
            if outs:
                first = time.perf_counter() - t0
        elif outs:
            step_times.append(time.perf_counter() - t)
    assert first is not None
    return dict(tokens=n, prefill_s=round(first, 3), prefill_tok_s=round(n / first, 1),
                decode_step_ms=round(1e3 * sum(step_times) / max(len(step_times), 1), 2),
                peak_kv_blocks=peak, blocks_needed=-(-(n + decode_steps + 1)
                                                     // kv.block_size),
                rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,32768,100000")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="chunk size (default 4096 on the CPU, 8192 on a GPU)")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--gpu-8b", action="store_true",
                    help="Llama-3-8B-shaped dummy model at 100k tokens (needs a GPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax

    from jpaged.config.engine import EngineConfig
    from jpaged.engine.llm_engine import LLMEngine
    from jpaged.sampling_params import SamplingParams
    from jpaged.tiny import make_tiny_model

    if args.gpu_8b and jax.default_backend() != "gpu":
        print("bench_long_context: --gpu-8b needs a GPU visible to JAX "
              f"(backend: {jax.default_backend()})", file=sys.stderr)
        return 2
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.gpu_8b and args.lengths == ap.get_default("lengths"):
        lengths = [100_000]
    longest = max(lengths)
    path = tempfile.mkdtemp(prefix="jpaged-long-")
    if args.gpu_8b:
        make_tiny_model(path, arch="llama", dtype="bfloat16", write_weights=False,
                        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        rope_theta=500000.0, max_position_embeddings=131072)
        extra = dict(load_format="dummy", dtype="bfloat16", attention_backend="pallas")
    else:
        make_tiny_model(path, max_position_embeddings=131072)
        extra = {}
    budget = args.max_num_batched_tokens or (8192 if args.gpu_8b else 4096)
    need = -(-(longest + args.decode_steps + 1) // args.block_size)
    engine = LLMEngine(EngineConfig(
        model=path, block_size=args.block_size, max_model_len=longest + args.decode_steps + 8,
        max_num_seqs=1, max_num_batched_tokens=budget, num_kv_blocks=need + 1,
        enable_prefix_caching=False, compile_all_buckets=False, **extra))
    run_one(engine, budget + 1, 2, SamplingParams, "warm-up")
    rows = []
    for n in lengths:
        res = run_one(engine, n, args.decode_steps, SamplingParams, str(n))
        res.update(block_size=args.block_size, chunk=budget,
                   model="llama-3-8b-dummy" if args.gpu_8b else "tiny (hidden 64, 2 layers)",
                   device=str(jax.devices()[0].device_kind))
        rows.append(res)
        print(f"{n:>7} tokens: prefill {res['prefill_s']:8.2f} s "
              f"({res['prefill_tok_s']:9.1f} tok/s), decode step {res['decode_step_ms']:8.2f} ms,"
              f" peak KV blocks {res['peak_kv_blocks']}/{res['blocks_needed']} needed, "
              f"host RSS {res['rss_gib']} GiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

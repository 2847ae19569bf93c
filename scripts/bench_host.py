#!/usr/bin/env python3
"""Host overhead of the engine loop, on a model so small that the device work
is a few milliseconds: what is left is the engine's own Python.

For each decode batch (``--batches``, default 64 and 256) and output length
(``--lengths``, default 128 and 2048) a fresh process builds a tiny Llama
(hidden 64, 2 layers), queues that many requests of 16 prompt tokens with
``ignore_eos`` and enough ``max_tokens`` that nobody finishes inside the
timing, decodes until every sequence has about that many output tokens, then
times ``--steps`` engine steps. The timed window is a steady state, and the
script checks it: nothing compiled and the batch size did not change inside it.
It reports wall milliseconds per step, the device time of the same step (the
runner replays it), the host time and share (wall minus device), and output
tokens/s, with async scheduling on and off.

``--baseline REV`` runs the same measurement on another commit (checked out
in a temporary git worktree; an engine without async scheduling runs sync
only) in the same run, and prints the ratios.

Example: python scripts/bench_host.py --baseline c3c9170
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPT_LEN = 16


def worker(batch: int, length: int, async_scheduling: bool | None, steps: int) -> dict:
    import numpy as np

    from jpaged import LLMEngine, SamplingParams
    from jpaged.tiny import make_tiny_model

    model = make_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"), hidden_size=64,
                            num_hidden_layers=2, max_position_embeddings=4096)
    max_len = PROMPT_LEN + length + steps + 16
    kw = dict(model=model, max_num_seqs=batch, max_num_batched_tokens=max(128, batch),
              max_model_len=max_len, block_size=16,
              num_kv_blocks=batch * -(-max_len // 16) + 1)
    if async_scheduling is not None:
        kw["async_scheduling"] = async_scheduling
    engine = LLMEngine(**kw)
    sp = dict(temperature=0, max_tokens=length + steps + 8, ignore_eos=True)
    if "output_kind" in SamplingParams.__dataclass_fields__:
        sp["output_kind"] = "delta"  # what the serving front end asks for
    rng = np.random.default_rng(0)
    for i in range(batch):
        engine.add_request(str(i), [int(t) for t in rng.integers(10, 1000, PROMPT_LEN)],
                           SamplingParams(**sp))
    started: set[str] = set()
    n_steps = 0
    while len(started) < batch:  # prefill everything
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                started.add(out.request_id)
        n_steps += 1
    for _ in range(max(0, length - steps - n_steps)):  # decode up to the window
        engine.step()
    stats0, compiles0 = engine.get_stats(), engine.runner.num_compiles
    assert stats0.num_running == batch and stats0.num_waiting == 0, stats0
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps
    stats1 = engine.get_stats()
    assert engine.runner.num_compiles == compiles0, "something compiled inside the timing"
    assert stats1.num_running == batch, "the batch changed inside the timing"
    device = None
    if hasattr(engine.runner, "replay_last_step"):
        device = engine.runner.replay_last_step(10)
    return dict(batch=batch, length=length, mode=("sync" if async_scheduling is False else
                                                  "async" if async_scheduling else "sync"),
                wall_ms=wall * 1e3, device_ms=None if device is None else device * 1e3,
                tok_s=batch / wall)


def run(tree: str, batch: int, length: int, mode: str | None, steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(batch), str(length),
           mode or "none", str(steps)]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker failed ({tree}, {batch}, {length}, {mode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--steps", type=int, default=32, help="timed steps per configuration")
    p.add_argument("--baseline", default=None, help="a git revision to measure side by side")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        b, n, mode, steps = args.worker
        a = None if mode == "none" else mode == "async"
        print(json.dumps(worker(int(b), int(n), a, int(steps))))
        return 0

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("this tree", here, ["async", "sync"])]
    tmp = None
    if args.baseline:
        tmp = tempfile.mkdtemp(prefix="jpaged-baseline-")
        subprocess.run(["git", "-C", here, "worktree", "add", "--detach", tmp, args.baseline],
                       check=True, capture_output=True)
        trees.append((f"baseline {args.baseline}", tmp, [None]))
    rows = []
    try:
        for b in args.batches:
            for n in args.lengths:
                for name, tree, modes in trees:
                    for mode in modes:
                        r = run(tree, b, n, mode, args.steps)
                        r["tree"] = name
                        rows.append(r)
                        print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        if tmp:
            subprocess.run(["git", "-C", here, "worktree", "remove", "--force", tmp],
                           check=False, capture_output=True)

    print(f"{'tree':<22} {'mode':<6} {'batch':>5} {'length':>6} {'wall ms':>8} "
          f"{'device ms':>9} {'host ms':>8} {'host %':>6} {'tok/s':>9}")
    for r in rows:
        dev = r["device_ms"]
        host = None if dev is None else max(0.0, r["wall_ms"] - dev)
        dev_s = "-" if dev is None else f"{dev:.2f}"
        host_s = "-" if host is None else f"{host:.2f}"
        share = "-" if host is None else f"{100 * host / r['wall_ms']:.0f}"
        print(f"{r['tree']:<22} {r['mode']:<6} {r['batch']:>5} {r['length']:>6} "
              f"{r['wall_ms']:>8.2f} {dev_s:>9} {host_s:>8} {share:>6} {r['tok_s']:>9.0f}")
    if args.baseline:
        for b in args.batches:
            for n in args.lengths:
                new = [r for r in rows if r["tree"] == "this tree" and r["batch"] == b
                       and r["length"] == n and r["mode"] == "async"][0]
                old = [r for r in rows if r["tree"] != "this tree" and r["batch"] == b
                       and r["length"] == n][0]
                print(f"batch {b}, length {n}: async tok/s {new['tok_s'] / old['tok_s']:.2f}x "
                      f"the baseline")
    sync = {(r["batch"], r["length"]): r for r in rows
            if r["tree"] == "this tree" and r["mode"] == "sync"}
    for b in args.batches:
        if len(args.lengths) > 1:
            lo, hi = sync[(b, min(args.lengths))], sync[(b, max(args.lengths))]
            h = lambda r: r["wall_ms"] - r["device_ms"]  # noqa: E731
            print(f"batch {b}: sync host ms/step at length {max(args.lengths)} is "
                  f"{h(hi) / h(lo):.2f}x that at {min(args.lengths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Steady-state engine timing on a Llama-3-8B-shaped ``dummy`` checkpoint (bf16).

For a GPU machine (run by scripts/gpu_check.sh). Builds a config-and-tokenizer
directory with Llama-3-8B shapes (``load_format="dummy"``: random bf16 weights
on the device, no files) and, with async scheduling on and off, measures a
*steady* decode state at each batch size (default 1, 64, 256): all requests
are prefilled and have emitted tokens before the timed loop, none can finish
inside it (``max_tokens`` far above the steps timed, ``ignore_eos``), and the
loop asserts that the compile counter, the running batch, the waiting queue
and the preemption count did not change. It reports wall time per
``engine.step()`` and device time per step (``runner.replay_last_step``,
which replays the last step's inputs with ``block_until_ready``; a column of
``-`` with a note when the runner lacks it), against the weights-read floor
(parameter bytes over the measured copy bandwidth). Then output tokens/s of
the ShareGPT-like workload of scripts/bench_throughput.py, run twice (the
first pass compiles whatever buckets it touches; the second is timed).

``--ab NAME`` is one arm of an XLA-flag A/B (XLA_FLAGS set by the caller):
batch 64, async on, no throughput run; prints one ``AB {json}`` line.
``--dump-hlo DIR`` dumps the optimized HLO and reports how much of the
largest module (the step) runs inside command buffers (CUDA graphs).
``--quant-modes none,int8:xla,int8:pallas,...`` times the steady decode state
with weights quantized at load (``quantization=``) and the quantized matmul
forced to XLA's fused dequantize or the Pallas kernel (JPAGED_QUANT_MATMUL),
one engine per mode, each against its own weights-read floor; one ``QUANT
{json}`` line per mode and batch (use ``--layers`` to keep the on-the-fly
quantization of the dummy weights short).
``--smoke`` runs tiny shapes on any backend, to check the script itself.
Exits 2 with one line when no GPU is visible (unless ``--smoke``).
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def copy_bandwidth(jax, jnp, nbytes: int) -> float:
    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * jnp.bfloat16(0.5))  # reads and writes nbytes each
    f(x).block_until_ready()
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        x = f(x)
    x.block_until_ready()
    return 2 * nbytes * reps / (time.perf_counter() - t)


def steady_state(engine, batch: int, args, SamplingParams) -> dict:
    """Fills a batch, then times ``args.steps`` decode-only steps."""
    max_tokens = args.max_model_len - args.prompt_len
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, [1 + (i * 7 + j) % 1000 for j in range(args.prompt_len)], sp)
    seen: set[str] = set()
    for _ in range(10_000):  # prefill: a request emits a token only once prefilled
        seen.update(o.request_id for o in engine.step())
        if len(seen) == batch:
            break
    assert len(seen) == batch, f"only {len(seen)} of {batch} requests started decoding"
    for _ in range(3):  # the decode shape compiled and warm (and the async pipeline full)
        engine.step()
    before, compiles = engine.get_stats(), engine.runner.num_compiles
    t = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    wall = (time.perf_counter() - t) / args.steps
    after = engine.get_stats()
    assert engine.runner.num_compiles == compiles, (
        f"{engine.runner.num_compiles - compiles} compiles inside the timed loop")
    assert before.num_running == after.num_running == batch, (before, after)
    assert after.num_waiting == 0 and after.num_preemptions == before.num_preemptions, after
    replay = getattr(engine.runner, "replay_last_step", None)
    device = replay(args.replays) if replay is not None else None
    engine.abort_request(ids)
    engine.step()  # releases the aborted rows
    return dict(batch=batch, wall_ms=wall * 1e3,
                device_ms=device * 1e3 if device is not None else None,
                tok_s=batch / wall)


def throughput(engine, args, SamplingParams, vocab: int) -> dict:
    from bench_throughput import workload

    prompts, out_lens = workload(args.throughput_prompts, args.length_scale, 0, vocab,
                                 args.max_model_len)
    res = {}
    for name in ("warm", "timed"):
        compiles = engine.runner.num_compiles
        for i, (p, o) in enumerate(zip(prompts, out_lens)):
            engine.add_request(f"{name}-{i}", p, SamplingParams(
                temperature=0, max_tokens=o, ignore_eos=True))
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        res = dict(requests=len(prompts), output_tokens=sum(out_lens),
                   seconds=time.perf_counter() - t,
                   compiles=engine.runner.num_compiles - compiles)
    res["tok_s"] = res["output_tokens"] / res["seconds"]
    return res


def command_buffer_report(dump_dir: str) -> str:
    """How much of the largest optimized module runs in command buffers."""
    files = glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))
    if not files:
        return "no optimized HLO dumped"
    text = open(max(files, key=os.path.getsize)).read()
    entry = text[text.rfind("\nENTRY "):]
    entry = entry[:entry.find("\n}\n") + 1]
    ops = [ln for ln in entry.splitlines()[1:] if " = " in ln]
    in_cb = sum("command_buffer" in ln for ln in ops)
    launches = sum(bool(re.search(r" (fusion|custom-call|while|conditional)\(", ln))
                   for ln in ops)
    return (f"ENTRY: {in_cb} command-buffer calls, {launches} kernels/loops outside them "
            f"({len(ops)} ops)")


def quant_modes(args, batches, make_engine, SamplingParams, jax, jnp) -> int:
    from jpaged.layers.linear import QUANT_MATMUL_ENV
    from jpaged.model_loader.loader import weight_bytes

    bw = copy_bandwidth(jax, jnp, 1 << 30 if not args.smoke else 1 << 20)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; layers {args.layers}", flush=True)
    rows = []
    for mode in args.quant_modes.split(","):
        quant, _, backend = mode.partition(":")
        quant = None if quant == "none" else quant
        os.environ[QUANT_MATMUL_ENV] = backend or "auto"
        t = time.perf_counter()
        engine = make_engine(True, quant)
        load_s = time.perf_counter() - t
        nbytes = weight_bytes(engine.runner.params)
        for batch in batches:
            r = steady_state(engine, batch, args, SamplingParams)
            r.update(mode=mode, weight_gib=nbytes / 2**30, floor_ms=nbytes / bw * 1e3,
                     load_s=load_s)
            rows.append(r)
            print("QUANT " + json.dumps(r), flush=True)
        del engine
        gc.collect()
    os.environ.pop(QUANT_MATMUL_ENV, None)
    print("\n| weights:matmul | GiB | batch | device ms/step | wall ms/step | device vs floor |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dev = r["device_ms"]
        print(f"| {r['mode']} | {r['weight_gib']:.2f} | {r['batch']} | "
              f"{dev:.2f} | {r['wall_ms']:.2f} | {dev / r['floor_ms']:.2f}x |"
              if dev is not None else f"| {r['mode']} | {r['batch']} | - | {r['wall_ms']:.2f} | - |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(copy_gb_s=bw / 1e9, rows=rows), fh, indent=1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--async-modes", default="on,off")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--throughput-prompts", type=int, default=64)
    ap.add_argument("--length-scale", type=float, default=0.5)
    ap.add_argument("--ab", default=None, help="one A/B arm: batch 64, async on, one line")
    ap.add_argument("--dump-hlo", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quant-modes", default=None,
                    help="comma list of none | <int8|int4|fp8>:<xla|pallas>")
    args = ap.parse_args()
    if args.dump_hlo:  # before jax reads XLA_FLAGS
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to="
                                   f"{args.dump_hlo} --xla_dump_hlo_as_text").strip()

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

    batches = [int(b) for b in args.batches.split(",")]
    modes = [m == "on" for m in args.async_modes.split(",")]
    if args.ab:
        batches, modes, args.throughput_prompts = [64], [True], 0
    if args.smoke:
        shape = dict(vocab_size=1024, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        args.prompt_len, args.steps, args.replays, args.max_model_len = 16, 4, 2, 128
        batches = [1, 4] if not args.ab else [4]
        args.throughput_prompts = min(args.throughput_prompts, 6)
    else:  # Llama-3-8B
        shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=args.layers, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500000.0,
                     max_position_embeddings=8192)
    path = os.path.join(tempfile.gettempdir(), f"jpaged-llama3-8b-shape-{shape['hidden_size']}"
                        f"-{shape['num_hidden_layers']}")
    make_tiny_model(path, arch="llama", dtype="bfloat16", write_weights=False, **shape)
    block_size = 16
    # An explicit cache size skips the activation profiling (more compiles of
    # the step): the largest batch at its longest, or the throughput workload.
    blocks_per_seq = -(-args.max_model_len // block_size)
    steady = max(batches) * -(-(args.prompt_len + args.steps + 16) // block_size)
    num_blocks = 1 + max(steady, args.throughput_prompts * blocks_per_seq) + 64

    def make_engine(async_on: bool, quantization: str | None = None):
        return LLMEngine(EngineConfig(
            model=path, load_format="dummy", dtype="bfloat16",
            max_model_len=args.max_model_len, max_num_seqs=max(batches),
            max_num_batched_tokens=2048 if not args.smoke else 64, block_size=block_size,
            num_kv_blocks=num_blocks, compile_all_buckets=False, enable_prefix_caching=False,
            async_scheduling=async_on, quantization=quantization))

    if args.quant_modes:
        return quant_modes(args, batches, make_engine, SamplingParams, jax, jnp)

    rows, tput, notes = [], None, []
    floor_ms = None
    for async_on in modes:
        engine = make_engine(async_on)
        if floor_ms is None:
            params = jax.tree.leaves(engine.runner.params)
            param_bytes = sum(p.size * p.dtype.itemsize for p in params)
            bw = copy_bandwidth(jax, jnp, 1 << 30 if not args.smoke else 1 << 20)
            floor_ms = param_bytes / bw * 1e3
            print(f"model: {sum(p.size for p in params) / 1e9:.2f}B params, "
                  f"{param_bytes / 2**30:.1f} GiB; copy bandwidth {bw / 1e9:.0f} GB/s; "
                  f"weights-read floor {floor_ms:.2f} ms/step; KV blocks {num_blocks}",
                  flush=True)
        if not hasattr(engine.runner, "replay_last_step") and not notes:
            notes.append("device time: this runner has no replay_last_step(); column left out")
        for batch in batches:
            r = steady_state(engine, batch, args, SamplingParams)
            r["async"] = async_on
            rows.append(r)
            print(json.dumps(r), flush=True)
        if async_on and args.throughput_prompts:
            tput = throughput(engine, args, SamplingParams, shape["vocab_size"])
            print(json.dumps(dict(throughput=tput)), flush=True)
        del engine
        gc.collect()

    cb = command_buffer_report(args.dump_hlo) if args.dump_hlo else None
    if args.ab:
        r = rows[0]
        print("AB " + json.dumps(dict(name=args.ab, batch=r["batch"], wall_ms=r["wall_ms"],
                                      device_ms=r["device_ms"], command_buffers=cb,
                                      xla_flags=os.environ.get("XLA_FLAGS", ""))))
        return 0
    print("\n| async | batch | device ms/step | wall ms/step | host share | output tok/s "
          "| device vs floor |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        dev, wall = r["device_ms"], r["wall_ms"]
        dev_s, share, vs_floor = "-", "-", "-"
        if dev is not None:
            dev_s, share, vs_floor = f"{dev:.2f}", f"{1 - dev / wall:.0%}", f"{dev / floor_ms:.2f}x"
        print(f"| {'on' if r['async'] else 'off'} | {r['batch']} | {dev_s} | {wall:.2f} | "
              f"{share} | {r['tok_s']:.0f} | {vs_floor} |")
    for n in notes:
        print(f"note: {n}")
    if tput:
        print(f"throughput (ShareGPT-like, {tput['requests']} requests, {tput['output_tokens']} "
              f"output tokens, async on): {tput['tok_s']:.0f} output tokens/s "
              f"({tput['compiles']} compiles in the timed pass)")
    if cb:
        print(f"command buffers: {cb}")
    print(f"weights-read floor: {floor_ms:.2f} ms/step")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(floor_ms=floor_ms, steady=rows, throughput=tput, notes=notes,
                           command_buffers=cb), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

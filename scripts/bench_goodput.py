#!/usr/bin/env python3
"""Goodput of a two-class workload under the fcfs, priority and slo policies.

Interactive requests (short prompts and outputs, priority 0, a tight
time-to-first-token SLO and deadline) and batch requests (long prompts and
outputs, priority 1, a loose deadline) arrive as one Poisson stream at each
request rate, against the Python API (`AsyncLLM`, one engine per policy,
compiled before the timed runs). A request counts toward goodput when it
finishes within its deadline and its first token came within its TTFT SLO;
refused (`RequestRefused`) and expired (``stop_reason="deadline"``)
requests count against it. SLOs are multiples of each class's latency on an
idle engine, measured first, so the table means the same on any machine.
Prints one row per (rate, policy): goodput per class in requests/s, and how
many of each class met their SLOs, were refused, or expired.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time

import numpy as np

CLASSES = {  # prompt tokens, output tokens, priority
    "interactive": (32, 16, 0),
    "batch": (384, 96, 1),
}


def params_for(cls: str, slo: dict, SamplingParams):
    _, out, _ = CLASSES[cls]
    return SamplingParams(temperature=0, max_tokens=out, ignore_eos=True,
                          deadline_ms=slo[cls]["deadline_ms"],
                          ttft_slo_ms=slo[cls].get("ttft_ms"))


async def one(llm, cls, prompt, sp, delay, res, RequestRefused):
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    first = last = None
    try:
        async for out in llm.generate(prompt, sp, priority=CLASSES[cls][2]):
            if first is None and out.outputs and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
            last = out
    except RequestRefused:
        res.append((cls, "refused"))
        return
    e2e = time.perf_counter() - t0
    c = last.outputs[0]
    if c.stop_reason == "deadline":
        res.append((cls, "expired"))
    elif (first is not None and sp.ttft_slo_ms is not None and first * 1e3 > sp.ttft_slo_ms) \
            or e2e * 1e3 > sp.deadline_ms:
        res.append((cls, "late"))
    else:
        res.append((cls, "met"))


async def run_rate(llm, rate, num, slo, seed, SamplingParams, RequestRefused):
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, num)
    arrivals = np.cumsum(gaps) - gaps[0]
    kinds = rng.choice(list(CLASSES), num, p=[0.7, 0.3])
    res: list = []
    tasks = []
    for i, (t, cls) in enumerate(zip(arrivals, kinds)):
        prompt = rng.integers(3, 900, CLASSES[cls][0]).tolist()
        tasks.append(one(llm, cls, prompt, params_for(cls, slo, SamplingParams), float(t),
                         res, RequestRefused))
    start = time.perf_counter()
    await asyncio.gather(*tasks)
    return res, time.perf_counter() - start


async def solo_latency(llm, cls, SamplingParams):
    prompt = list(range(3, 3 + CLASSES[cls][0]))
    sp = SamplingParams(temperature=0, max_tokens=CLASSES[cls][1], ignore_eos=True)
    best = (1e9, 1e9)
    for _ in range(3):
        t0 = time.perf_counter()
        first = None
        async for out in llm.generate(prompt, sp):
            if first is None:
                first = time.perf_counter() - t0
        best = min(best, (first, time.perf_counter() - t0))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: a tiny Llama)")
    ap.add_argument("--rates", default="2,6,12", help="requests per second")
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--policies", default="fcfs,priority,slo")
    ap.add_argument("--ttft-factor", type=float, default=4.0,
                    help="interactive TTFT SLO = this x its idle TTFT")
    ap.add_argument("--deadline-factor", type=float, default=4.0,
                    help="interactive deadline = this x its idle latency; batch: 5x this")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from jpaged.config.engine import EngineConfig
    from jpaged.engine.async_llm import AsyncLLM
    from jpaged.engine.llm_engine import LLMEngine
    from jpaged.sampling_params import SamplingParams
    from jpaged.sched import RequestRefused
    from jpaged.tiny import make_tiny_model

    model = args.model or make_tiny_model(tempfile.mkdtemp(prefix="jpaged-goodput-"))
    rows, slo = [], None
    for policy in args.policies.split(","):
        engine = LLMEngine(EngineConfig(
            model=model, scheduling_policy=policy, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=512))
        llm = AsyncLLM(engine)
        try:
            if slo is None:  # from the first engine, the same for every policy
                lat = {c: asyncio.run(solo_latency(llm, c, SamplingParams)) for c in CLASSES}
                slo = {"interactive": {"ttft_ms": 1e3 * args.ttft_factor * lat["interactive"][0],
                                       "deadline_ms": 1e3 * args.deadline_factor
                                       * lat["interactive"][1]},
                       "batch": {"deadline_ms": 5e3 * args.deadline_factor * lat["batch"][1]}}
                print("SLOs (ms):", json.dumps({c: {k: round(v, 1) for k, v in d.items()}
                                                for c, d in slo.items()}), flush=True)
            for rate in (float(r) for r in args.rates.split(",")):
                res, secs = asyncio.run(run_rate(llm, rate, args.num_requests, slo, 0,
                                                 SamplingParams, RequestRefused))
                row = dict(policy=policy, rate=rate, seconds=round(secs, 2))
                for c in CLASSES:
                    got = [r for k, r in res if k == c]
                    row[c] = {s: got.count(s) for s in ("met", "late", "expired", "refused")}
                    row[c]["goodput"] = round(row[c]["met"] / secs, 3)
                rows.append(row)
                print(f"rate {rate:5.1f}/s {policy:>8}: " + "  ".join(
                    f"{c} goodput {row[c]['goodput']:.2f}/s (met {row[c]['met']}, late "
                    f"{row[c]['late']}, expired {row[c]['expired']}, refused "
                    f"{row[c]['refused']})" for c in CLASSES), flush=True)
        finally:
            llm.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(slo=slo, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark an OpenAI-compatible server, shaped after ``vllm bench serve``.

Sends ``--num-prompts`` streaming ``/v1/completions`` requests of a synthetic
workload (random token-id prompts of ``--input-len`` tokens, ``--output-len``
tokens out with ``ignore_eos``), either as a Poisson process at
``--request-rate`` requests/s or at a fixed ``--max-concurrency``, and prints
completed and failed counts, throughput and TTFT / TPOT / ITL / end-to-end
latency (mean, median, p99).

    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 \\
        --model my-model --num-prompts 200 --request-rate 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> Result:
    res = Result(prompt_len=len(body["prompt"]))
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                    return res
                now = time.perf_counter()
                if chunk.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
        res.latency = time.perf_counter() - start
        res.ok = res.ttft > 0
        if not res.ok:
            res.error = "no tokens"
    except Exception as e:  # noqa: BLE001 - a failed request is a data point
        res.error = f"{type(e).__name__}: {e}"
    return res


def make_workload(n: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
                  seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    lo_in, hi_in = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
    lo_out, hi_out = int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio))
    return [([rng.randrange(10, vocab) for _ in range(rng.randint(max(1, lo_in), hi_in))],
             rng.randint(max(1, lo_out), max(1, hi_out))) for _ in range(n)]


async def run(args) -> list[Result]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.base_url.rstrip("/") + "/v1/completions"
    work = make_workload(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                         args.vocab_size, args.seed)
    limits = httpx.Limits(max_connections=max(64, args.max_concurrency or 0) * 2)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    rng = np.random.default_rng(args.seed)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        async def limited(body):
            if sem is None:
                return await one_request(client, url, body, headers)
            async with sem:
                return await one_request(client, url, body, headers)

        tasks = []
        for prompt, out_len in work:
            body = {"model": args.model, "prompt": prompt, "max_tokens": out_len,
                    "temperature": args.temperature, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            tasks.append(asyncio.ensure_future(limited(body)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        return await asyncio.gather(*tasks)


def stats_ms(name: str, values: list[float]) -> list[str]:
    v = np.asarray(values or [0.0]) * 1000
    return [f"{'Mean ' + name + ' (ms):':<40}{v.mean():>10.2f}",
            f"{'Median ' + name + ' (ms):':<40}{np.median(v):>10.2f}",
            f"{'P99 ' + name + ' (ms):':<40}{np.percentile(v, 99):>10.2f}"]


def report(args, results: list[Result], elapsed: float) -> None:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="),
             f"{'Successful requests:':<40}{len(ok):>10}",
             f"{'Failed requests:':<40}{len(failed):>10}",
             f"{'Request rate (req/s):':<40}{args.request_rate:>10}",
             f"{'Max concurrency:':<40}{str(args.max_concurrency):>10}",
             f"{'Benchmark duration (s):':<40}{elapsed:>10.2f}",
             f"{'Total input tokens:':<40}{in_tokens:>10}",
             f"{'Total generated tokens:':<40}{out_tokens:>10}",
             f"{'Request throughput (req/s):':<40}{len(ok) / elapsed:>10.2f}",
             f"{'Output token throughput (tok/s):':<40}{out_tokens / elapsed:>10.2f}",
             f"{'Total token throughput (tok/s):':<40}{(in_tokens + out_tokens) / elapsed:>10.2f}",
             "{s:{c}^60}".format(s=" Time to First Token ", c="-"),
             *stats_ms("TTFT", [r.ttft for r in ok]),
             "{s:{c}^60}".format(s=" Time per Output Token (excl. 1st token) ", c="-"),
             *stats_ms("TPOT", tpot),
             "{s:{c}^60}".format(s=" Inter-token Latency ", c="-"),
             *stats_ms("ITL", itl),
             "{s:{c}^60}".format(s=" End-to-end Latency ", c="-"),
             *stats_ms("E2EL", [r.latency for r in ok]),
             "=" * 60]
    print("\n".join(lines))
    for r in failed[:5]:
        print(f"failed: {r.error}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--api-key", default=os.environ.get("JPAGED_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly in [len*(1-r), len*(1+r)]")
    p.add_argument("--vocab-size", type=int, default=1000, help="prompt token ids below this")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    print(f"{args.num_prompts} requests, input {args.input_len}, output {args.output_len}, "
          f"rate {args.request_rate}, max concurrency {args.max_concurrency}")
    start = time.perf_counter()
    results = asyncio.run(run(args))
    report(args, results, time.perf_counter() - start)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

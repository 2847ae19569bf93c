#!/usr/bin/env python3
"""A bounded soak of the OpenAI server on loopback: a fixed number of requests
from concurrent clients under a time cap, then an audit.

The clients mix completions and chat, JSON and Server-Sent Events, several
prompts and ``n > 1``, streams dropped mid-way, requests abandoned before
their answer (aborts), tight ``deadline_ms``, hostile bodies and oversized
ones. It starts once the server's background warm-up has compiled every
step bucket (``jpaged:warmup_compiles_pending`` is 0), after a few warm-up
requests. By default the script starts ``jpaged serve`` on 127.0.0.1 with a tiny
model (``--url`` points it at a running loopback server instead; then pass
``--server-pid`` for the memory check). After the run it checks that: no
answer was a 5xx (nor a stream's error event); every accepted request ended
exactly once (the server's ``jpaged:requests_accepted`` equals the sum of
``jpaged:requests_ended`` by outcome, none is open, no end was counted twice)
and the server's counts agree with what the clients saw, within what races
allow (a stream dropped just as it finished counts as completed on the
server); ``/metrics`` shows nothing running or waiting and no KV cache in use;
and the server's resident memory (median over the last third of the run
minus median over the first third) grew less than ``--rss-bound-mib``.
Prints a JSON summary; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from urllib.parse import urlparse

KEY = "sk-soak"
MODEL = "soak"
SERVER_ARGS = ["--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--max-model-len", "256",
               "--max-request-bytes", "65536", "--kv-cache-memory", str(4 << 20)]
WORDS = ("the cat sat on a mat while rain fell over quiet hills and "
         "old ships sailed past bright towers into the night").split()
C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
# Hostile bodies: each must be refused with a 4xx and never reach the engine.
HOSTILE = [
    (C, b"{not json", 400), (C, b"\xff\xfe\x00", 400), (C, b"[" * 5000 + b"]" * 5000, 400),
    (C, {"prompt": 5}, 400), (C, {"prompt": "x", "max_tokens": -1}, 400),
    (C, {"prompt": "x", "n": 10**30}, 400), (C, {"prompt": "x", "temperature": "hot"}, 400),
    (C, b'{"prompt": "x", "top_p": NaN}', 400), (C, {"prompt": [999999]}, 400),
    (C, {"prompt": "x", "model": "nope"}, 404), (C, {"prompt": "x", "deadline_ms": -5}, 400),
    (C, {"prompt": "x", "logit_bias": {"abc": 1}}, 400), (C, {"prompt": ""}, 400),
    (CH, {"messages": []}, 400), (CH, {"messages": "hi"}, 400),
    (CH, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    (CH, {"messages": MSG, "n": 0}, 400), ("/tokenize", {}, 400),
]
KINDS = {"complete": 4, "complete_sse": 4, "chat": 3, "chat_sse": 3, "disconnect": 3,
         "abort": 2, "deadline": 3, "hostile": 3, "oversized": 1}


class Tally:
    """What the clients saw; outcomes are counted per prompt (an engine request)."""

    def __init__(self):
        self.status = Counter()  # HTTP status by kind, "kind:status"
        self.outcome = Counter()  # completed, expired, refused, cancelled (client view)
        self.accepted = 0  # prompts of requests answered 200 (the engine took them)
        self.unknown = 0  # prompts of requests abandoned before any answer
        self.problems: list[str] = []


def prompt_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24)))


def make_body(rng: random.Random, chat: bool, stream: bool, **extra) -> tuple[dict, int]:
    """A generation body and its number of prompts."""
    body = {"model": MODEL, "max_tokens": rng.randint(2, 24), "n": rng.choice([1, 1, 2, 3]),
            "temperature": rng.choice([0, 0.8]), "stream": stream, **extra}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt_text(rng)}]
        return body, 1
    k = rng.choice([1, 1, 2])
    text = rng.random() < 0.7  # else token ids (all prompts of a request alike)
    prompts = [prompt_text(rng) if text else
               [rng.randint(5, 900) for _ in range(rng.randint(2, 30))] for _ in range(k)]
    body["prompt"] = prompts[0] if k == 1 else prompts
    return body, k


def choice_outcomes(choices: list[dict], n: int, num_prompts: int) -> list[str]:
    """Per prompt: 'expired' if a sample stopped on its deadline, else 'completed'."""
    expired = {c["index"] // n for c in choices if c.get("stop_reason") == "deadline"}
    return ["expired" if i in expired else "completed" for i in range(num_prompts)]


async def read_sse(resp, stop_after: int | None, t: Tally) -> tuple[list[dict], bool]:
    """(choices with a finish reason, whether [DONE] came); stops early after
    ``stop_after`` events (a client that goes away)."""
    finals, events = [], 0
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return finals, True
        obj = json.loads(data)
        if "error" in obj:
            code, msg = obj["error"].get("code"), obj["error"].get("message", "")
            refused = code == 503 and "refused" in msg  # a deadline refusal, told in-band
            if not isinstance(code, int) or (code >= 500 and not refused):
                t.problems.append(f"stream error event: {data[:200]}")
            finals.append({"error": obj["error"]})
        for c in obj.get("choices", []):
            if c.get("finish_reason") is not None:
                finals.append(c)
        events += 1
        if stop_after is not None and events >= stop_after:
            return finals, False
    return finals, False


async def generation(client, url: str, kind: str, rng: random.Random, t: Tally) -> None:
    chat = kind.startswith("chat") or (kind in ("disconnect", "abort", "deadline")
                                       and rng.random() < 0.4)
    stream = kind.endswith("_sse") or kind == "disconnect" or (
        kind == "deadline" and rng.random() < 0.5)
    extra = {"ignore_eos": True, "max_tokens": rng.randint(60, 150),
             "deadline_ms": rng.uniform(1, 400)} if kind == "deadline" else {}
    if kind == "disconnect":
        extra = {"max_tokens": rng.randint(30, 120), "ignore_eos": True}
    body, k = make_body(rng, chat, stream, **extra)
    path = url + (CH if chat else C)
    if not stream:
        coro = client.post(path, json=body)
        try:
            r = await (asyncio.wait_for(coro, rng.uniform(0.02, 0.4)) if kind == "abort"
                       else coro)
        except TimeoutError:
            t.status[f"{kind}:gone"] += 1
            t.unknown += k
            t.outcome["cancelled"] += k
            return
        return settle(kind, r.status_code, r.json() if r.content else {}, body, k, t)
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return settle(kind, resp.status_code, resp.json(), body, k, t)
        t.status[f"{kind}:200"] += 1
        t.accepted += k
        stop = rng.randint(1, 4) if kind == "disconnect" else None
        finals, done = await read_sse(resp, stop, t)
    if not done:
        t.outcome["cancelled"] += k
    elif any("error" in f for f in finals):
        t.outcome["refused"] += k  # refused while waiting, told in-band
    else:
        for o in choice_outcomes(finals, body["n"], k):
            t.outcome[o] += 1


def settle(kind: str, status: int, obj: dict, body: dict, k: int, t: Tally) -> None:
    t.status[f"{kind}:{status}"] += 1
    if status == 200:
        t.accepted += k
        for o in choice_outcomes(obj.get("choices", []), body["n"], k):
            t.outcome[o] += 1
    elif status == 503 and "refused" in obj.get("error", {}).get("message", ""):
        t.outcome["refused"] += k
    elif status >= 500:
        t.problems.append(f"{kind}: {status} {json.dumps(obj)[:300]}")
    else:
        t.problems.append(f"{kind}: unexpected {status} {json.dumps(obj)[:300]}")


async def hostile(client, url: str, rng: random.Random, t: Tally, oversized: bool) -> None:
    if oversized:
        path, want = (C, 413) if rng.random() < 0.5 else (C, 400)
        body = b'{"prompt": "' + b"x" * 70000 + b'"}' if want == 413 else \
            json.dumps({"prompt": " ".join(WORDS * 120)}).encode()  # over max_model_len
    else:
        path, body, want = rng.choice(HOSTILE)
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await client.post(url + path, content=body, headers={"content-type": "application/json"})
    kind = "oversized" if oversized else "hostile"
    t.status[f"{kind}:{r.status_code}"] += 1
    try:
        err = r.json()["error"]
        shaped = set(err) >= {"message", "type", "param", "code"}
    except Exception:  # noqa: BLE001 - not OpenAI's error shape
        shaped = False
    if r.status_code != want or not shaped:
        t.problems.append(f"{kind} {path} {body[:80]!r}: {r.status_code} {r.text[:200]}")


async def worker(client, url: str, plan: asyncio.Queue, t: Tally) -> None:
    while True:
        try:
            kind, seed = plan.get_nowait()
        except asyncio.QueueEmpty:
            return
        rng = random.Random(seed)
        try:
            if kind in ("hostile", "oversized"):
                await hostile(client, url, rng, t, kind == "oversized")
            else:
                await generation(client, url, kind, rng, t)
        except Exception as e:  # noqa: BLE001 - recorded, the soak goes on
            t.problems.append(f"{kind}: client error {type(e).__name__}: {e}"[:300])


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_rss(pid: int | None, samples: list, period: float = 0.25) -> None:
    while pid is not None:
        v = rss_mib(pid)
        if v is not None:
            samples.append((time.monotonic(), v))
        await asyncio.sleep(period)


def read_metrics(text: str) -> dict:
    """``name`` or ``name{outcome}`` -> value, for the jpaged: samples."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("jpaged:") and not s.name.endswith("_created"):
                extra = s.labels.get("outcome")
                out[s.name + (f"{{{extra}}}" if extra else "")] = s.value
    return out


async def settled_metrics(client, url: str, timeout: float = 20.0) -> dict:
    """/metrics once nothing runs, waits or is open (or at the timeout)."""
    end = time.monotonic() + timeout
    while True:
        m = read_metrics((await client.get(url + "/metrics")).text)
        idle = not (m.get("jpaged:num_requests_running") or m.get("jpaged:num_requests_waiting")
                    or m.get("jpaged:requests_open") or m.get("jpaged:kv_cache_usage_perc"))
        if idle or time.monotonic() > end:
            return m
        await asyncio.sleep(0.2)


async def compiled(client, url: str, t: Tally, timeout: float = 600.0) -> None:
    """Wait until the server's background warm-up has compiled every bucket."""
    end = time.monotonic() + timeout
    while True:
        m = read_metrics((await client.get(url + "/metrics")).text)
        if not m.get("jpaged:warmup_compiles_pending"):
            return
        if time.monotonic() > end:
            t.problems.append(f"warm-up compiles still pending after {timeout:.0f} s")
            return
        await asyncio.sleep(0.5)


def audit(t: Tally, m: dict, rss: list, bound_mib: float, capped: bool) -> dict:
    """The checks of the module docstring; returns the server's counts and the
    memory figures, appending failures to ``t.problems``."""
    p = t.problems
    if capped:
        p.append("time cap hit before every request was answered")
    ended = {o: m.get(f"jpaged:requests_ended_total{{{o}}}", 0.0)
             for o in ("completed", "expired", "refused", "cancelled", "failed")}
    acc = m.get("jpaged:requests_accepted_total", 0.0)
    if acc != sum(ended.values()):
        p.append(f"server accepted {acc} requests but {sum(ended.values())} ended")
    for name in ("requests_open", "num_requests_running", "num_requests_waiting",
                 "kv_cache_usage_perc", "request_end_anomalies_total"):
        if m.get("jpaged:" + name, 0.0):
            p.append(f"after the run {name} = {m['jpaged:' + name]}")
    if ended["failed"]:
        p.append(f"{ended['failed']} requests failed on the server")
    c = t.outcome
    if not t.accepted <= acc <= t.accepted + t.unknown + c["refused"]:
        p.append(f"server accepted {acc}; clients saw {t.accepted} accepted, "
                 f"{t.unknown} abandoned unanswered, {c['refused']} refused")
    done_client, done_server = c["completed"] + c["expired"], ended["completed"] + ended["expired"]
    if not done_client <= done_server <= done_client + c["cancelled"]:
        p.append(f"server finished {done_server}, clients read {done_client} to the end "
                 f"and dropped {c['cancelled']}")
    if ended["cancelled"] > c["cancelled"] or ended["refused"] > c["refused"]:
        p.append(f"server cancelled {ended['cancelled']} / refused {ended['refused']}, "
                 f"clients {c['cancelled']} / {c['refused']}")
    mem = {}
    if len(rss) >= 6:
        t0, t1 = rss[0][0], rss[-1][0]
        third = (t1 - t0) / 3
        first = statistics.median(v for ts, v in rss if ts <= t0 + third)
        last = statistics.median(v for ts, v in rss if ts >= t1 - third)
        mem = {"rss_first_third_mib": round(first, 1), "rss_last_third_mib": round(last, 1),
               "rss_growth_mib": round(last - first, 1), "rss_bound_mib": bound_mib,
               "rss_peak_mib": round(max(v for _, v in rss), 1)}
        if last - first >= bound_mib:
            p.append(f"resident memory grew {last - first:.1f} MiB (bound {bound_mib})")
    return {"server_accepted": acc, "server_ended": ended, **mem}


async def soak(url: str, num: int, concurrency: int, cap: float, seed: int, pid: int | None,
               bound_mib: float, warmup: int) -> dict:
    import httpx

    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url must be a loopback address, not {host!r}")
    rng = random.Random(seed)
    kinds = [k for k, w in KINDS.items() for _ in range(w)]
    t = Tally()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        # Warm-up (not audited for memory): the server's background bucket
        # compiles finish, then every kind runs once, so compiles and caches
        # are in place before the first third is measured.
        await compiled(client, url, t)
        warm = asyncio.Queue()
        for i in range(warmup):
            warm.put_nowait((list(KINDS)[i % len(KINDS)], rng.getrandbits(32)))
        await asyncio.gather(*(worker(client, url, warm, t) for _ in range(concurrency)))
        plan = asyncio.Queue()
        for _ in range(num):
            plan.put_nowait((rng.choice(kinds), rng.getrandbits(32)))
        rss: list = []
        sampler = asyncio.ensure_future(sample_rss(pid, rss))
        start = time.monotonic()
        workers = asyncio.gather(*(worker(client, url, plan, t) for _ in range(concurrency)))
        capped = False
        try:
            await asyncio.wait_for(workers, cap)
        except TimeoutError:
            capped = True
        elapsed = time.monotonic() - start
        sampler.cancel()
        m = await settled_metrics(client, url)
    result = audit(t, m, rss, bound_mib, capped)
    return {"ok": not t.problems, "requests": num, "warmup_requests": warmup,
            "seconds": round(elapsed, 1), "concurrency": concurrency,
            "client_accepted_prompts": t.accepted, "client_abandoned_prompts": t.unknown,
            "client_outcomes": dict(t.outcome), **result,
            "statuses": dict(sorted(t.status.items())), "problems": t.problems[:20]}


def start_server(model: str, log_path: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "jpaged.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", MODEL, "--api-key", KEY, *SERVER_ARGS]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    end = time.monotonic() + 180
    while True:
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"server did not start; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running loopback server (default: start one)")
    ap.add_argument("--server-pid", type=int, help="its process id, for the memory check")
    ap.add_argument("--model", help="model directory (default: a tiny Llama)")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--time-cap", type=float, default=600.0, help="seconds")
    ap.add_argument("--warmup", type=int, default=2 * len(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-bound-mib", type=float, default=64.0)
    ap.add_argument("--json", help="also write the summary here")
    args = ap.parse_args(argv)
    proc, url, pid = None, args.url, args.server_pid
    if url is None:
        from jpaged.tiny import make_tiny_model

        tmp = tempfile.mkdtemp(prefix="jpaged-soak-")
        model = args.model or make_tiny_model(os.path.join(tmp, "model"))
        proc, url = start_server(model, os.path.join(tmp, "server.log"))
        pid = proc.pid
    try:
        summary = asyncio.run(soak(url, args.requests, args.concurrency, args.time_cap,
                                   args.seed, pid, args.rss_bound_mib, args.warmup))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

#!/usr/bin/env python3
"""Start-up time of `jpaged serve`: seconds from launch until /health answers 200.

Runs ``jpaged serve`` (the default model, SmolLM2-135M-Instruct, unless
``--model``) twice on a loopback port with a fresh, empty compile cache
directory: first cold (every step compiles), then warm (the compiled steps
come from the cache the first start wrote). The server's own log lines for
loading and warm-up are echoed, so the split between loading, KV profiling
and compiling is visible.

Example: python scripts/bench_startup.py
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_once(extra: list[str], cache: str, timeout: float) -> tuple[float, str]:
    port = free_port()
    env = dict(os.environ, JPAGED_COMPILE_CACHE=cache, JPAGED_API_KEY="")
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "jpaged.cli", "--log-level", "info",
                                 "serve", "--port", str(port), *extra],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"server exited:\n{log.read()[-3000:]}")
                if time.perf_counter() - start > timeout:
                    raise SystemExit("server did not become healthy in time")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                                timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.1)
            elapsed = time.perf_counter() - start
            # A background warm-up (serve's default) compiles the other buckets
            # after /health answers: wait for it (which also fills the cache
            # for the warm start), and report when every bucket was ready.
            all_ready = None
            while time.perf_counter() - start < timeout and proc.poll() is None:
                log.seek(0)
                text = log.read()
                if "warm-up: all " in text or re.search(  # or no background part
                        r"warm-up: \d+ compiles in [\d.]+s$", text, re.M):
                    all_ready = time.perf_counter() - start
                    break
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(60)
        log.seek(0)
        lines = [ln for ln in log.read().splitlines()
                 if re.search(r"loaded |KV cache:|profiled|warm-up: (\d+ compiles|all )", ln)]
    return elapsed, all_ready, "\n".join("    " + ln.split(": ", 1)[-1] for ln in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--timeout", type=float, default=600)
    args, extra = ap.parse_known_args()
    if args.model:
        extra = ["--model", args.model, *extra]
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold compile cache", "warm compile cache"):
            secs, all_ready, lines = start_once(extra, cache, args.timeout)
            print(f"jpaged serve healthy after {secs:.1f} s ({label})"
                  + (f"; every bucket compiled after {all_ready:.1f} s" if all_ready else ""))
            print(lines)


if __name__ == "__main__":
    main()

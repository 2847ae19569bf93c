"""Helpers for the server tests: a uvicorn server in a thread on 127.0.0.1
(shared per session, so one engine compile serves every server test module)
and a fake engine whose outputs are known by hand."""

from __future__ import annotations

import atexit
import socket
import threading
import time
from pathlib import Path

# Imported here, not on the first step: importing it (and JAX) inside the
# engine thread would hold the GIL for seconds in the middle of a test.
from jpaged.engine.llm_engine import EngineStats
from jpaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

API_KEY = "sk-test-key"
MODEL_NAME = "tiny-llama"
# Small: two token buckets (8, 16) to compile; 512 tokens per request.
ENGINE_KWARGS = dict(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=512,
                     kv_cache_memory=4 << 20)


class ThreadServer:
    """An app served by uvicorn in a daemon thread on a free 127.0.0.1 port."""

    def __init__(self, app, llm=None, **uvicorn_kw):
        import uvicorn

        from jpaged.serve.http import uvicorn_config

        self.app, self.llm = app, llm
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, port=self.port, **uvicorn_kw))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.llm is not None:
            self.llm.shutdown()

    def engine_state(self) -> dict:
        """Running/waiting counts and free blocks, read in the engine thread."""
        return self.llm.call(lambda e: {
            "running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting),
            "free": e.kv.num_free_blocks, "blocks": e.kv.num_blocks,
            "unfinished": e.get_num_unfinished_requests()})

    def wait_idle(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.engine_state()
            if (not st["running"] and not st["waiting"] and not st["unfinished"]
                    and st["free"] == st["blocks"] - 1) or time.monotonic() > deadline:
                return st
            time.sleep(0.05)


def metric(server: ThreadServer, prefix: str) -> float:
    """The sum of the /metrics samples whose line starts with ``prefix``."""
    import httpx

    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


_SHARED: dict = {}


def shared_server(model_dir: str) -> ThreadServer:
    """The session's real-engine server (API key `API_KEY`, name `MODEL_NAME`)."""
    if model_dir not in _SHARED:
        from jpaged.engine.async_llm import AsyncLLM
        from jpaged.config.engine import EngineConfig
        from jpaged.engine.llm_engine import LLMEngine
        from jpaged.serve.openai.app import build_app
        from jpaged.serve.openai.state import ServeConfig

        llm = AsyncLLM(LLMEngine(EngineConfig(model=model_dir, **ENGINE_KWARGS)))
        cfg = ServeConfig(served_model_names=[MODEL_NAME], model_path=model_dir,
                          api_keys=[API_KEY, "sk-second-key"], max_request_bytes=1 << 20)
        srv = ThreadServer(build_app(llm, cfg), llm)
        _SHARED[model_dir] = srv
        atexit.register(srv.stop)
    return _SHARED[model_dir]


# ------------------------------------------------------------ fake engine
class _FakeScheduler:
    def __init__(self):
        self.waiting: list = []
        self.running: list = []


class _FakeKV:
    num_blocks = 9
    num_free_blocks = 8


class _FakeModelConfig:
    vocab_size = 1024


class _FakeConfig:
    max_num_seqs = 8


EOS = 1023


class FakeEngine:
    """Request ``r`` with prompt ``p`` emits tokens 1, 2, ..., ``max_tokens``, one
    per step, as text ``"t1 t2 ..."`` (each token's text padded with ``pad``
    dots), for each of its ``n`` samples; at most ``max_running`` run at once.
    With ``eos_after=k`` a request stops after k tokens on an EOS token whose
    text is empty (finish reason "stop"). With ``logprobs`` asked, each token
    carries that many alternatives. A prompt ``"bad"`` is refused with
    ValueError; ``fail_after`` steps make `step` raise. With ``stagger=s``,
    sample k stops ``k * s`` tokens early. Every `add_request`
    is recorded in ``added`` as (request_id, priority, cache_salt). Outputs
    are cumulative, or deltas with ``output_kind="delta"``, as the engine's."""

    def __init__(self, max_running: int = 4, step_delay: float = 0.0,
                 fail_after: int | None = None, tokenizer=None, pad: int = 0,
                 eos_after: int | None = None, max_model_len: int = 512, stagger: int = 0):
        self.scheduler = _FakeScheduler()
        self.kv = _FakeKV()
        self.model_config = _FakeModelConfig()
        self.config = _FakeConfig()
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.max_running, self.step_delay, self.fail_after = max_running, step_delay, fail_after
        self.pad, self.eos_after, self.stagger = pad, eos_after, stagger
        self.groups: dict = {}
        self.steps = 0
        self.aborted: list[str] = []
        self.added: list[tuple] = []
        self.generated_at_abort: dict[str, int] = {}

    def add_request(self, request_id, prompt, params, priority=0, cache_salt=None):
        if prompt in ("bad", "") or request_id in self.groups:
            raise ValueError(f"prompt={prompt!r} is refused")
        n_max = params.max_tokens if params is not None and params.max_tokens else 16
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else [1, 2]
        self.groups[request_id] = {"n": 0, "max": n_max, "ids": list(ids),
                                   "samples": params.n if params is not None else 1,
                                   "logprobs": params.logprobs if params is not None else None,
                                   "delta": params is not None and params.output_kind == "delta",
                                   "sent": {}, "lps": {},
                                   "metrics": RequestMetrics(arrival_time=time.time())}
        self.added.append((request_id, priority, cache_salt))
        self.scheduler.waiting.append(request_id)

    def _token_text(self, t: int) -> str:
        return "" if t == EOS else f"t{t}" + "." * self.pad

    def _logprobs(self, toks: list[int], k: int) -> list:
        return [{t: Logprob(-0.5, 1, self._token_text(t)),
                 **{1000 + j: Logprob(-1.0 - j, j + 2, f"alt{j}") for j in range(k)}}
                for t in toks]

    def abort_request(self, request_id):
        ids = [request_id] if isinstance(request_id, str) else request_id
        for rid in ids:
            g = self.groups.pop(rid, None)
            if g is not None:
                self.aborted.append(rid)
                self.generated_at_abort[rid] = g["n"]
            for q in (self.scheduler.waiting, self.scheduler.running):
                if rid in q:
                    q.remove(rid)

    def has_unfinished_requests(self):
        return bool(self.groups)

    def get_num_unfinished_requests(self):
        return len(self.groups)

    def step(self):
        self.steps += 1
        if self.fail_after is not None and self.steps > self.fail_after:
            raise RuntimeError("injected engine failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        s = self.scheduler
        while s.waiting and len(s.running) < self.max_running:
            s.running.append(s.waiting.pop(0))
        outs = []
        for rid in list(s.running):
            g = self.groups[rid]
            g["n"] += 1
            eos = self.eos_after is not None and g["n"] > self.eos_after
            done = g["n"] >= g["max"] or eos
            now = time.time()
            m = g["metrics"]
            m.first_token_time = m.first_token_time or now
            m.first_scheduled_time = m.first_scheduled_time or now
            m.last_token_time = now
            outputs = [self._sample_output(g, k, eos) for k in range(g["samples"])]
            done = done or all(o.finish_reason for o in outputs)
            out = RequestOutput(request_id=rid, prompt=None, prompt_token_ids=g["ids"],
                                outputs=outputs, finished=done, metrics=m)
            if done:
                m.finished_time = now
                s.running.remove(rid)
                del self.groups[rid]
            outs.append(out)
        return outs

    def _sample_output(self, g: dict, k: int, eos: bool) -> CompletionOutput:
        """Sample ``k`` ends ``k * stagger`` tokens before ``max_tokens``. A
        delta costs only its new tokens (a long stream stays cheap)."""
        limit = max(1, g["max"] - k * self.stagger)
        n = min(g["n"], limit)
        n_sent = g["sent"].get(k, 0) if g["delta"] else 0
        toks = list(range(n_sent + 1, n + (0 if eos else 1))) + ([EOS] if eos else [])
        g["sent"][k] = n_sent + len(toks)
        text = " ".join(self._token_text(t) for t in toks if t != EOS)
        if n_sent and text:
            text = " " + text
        reason = "stop" if eos else ("length" if g["n"] >= limit else None)
        lps = self._logprobs(toks, g["logprobs"]) if g["logprobs"] is not None else None
        if lps is not None and not g["delta"]:
            g["lps"].setdefault(k, []).extend(lps)
            lps = list(g["lps"][k])
        return CompletionOutput(k, text, toks, None, lps, reason, EOS if eos else None)

    def get_stats(self):
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), 0.0,
                           0, 0, 0, 0, 0, 0)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, procs_and_logs, timeout: float) -> None:
    """Poll ``url``/health until it answers 200; fail with the log's tail if a
    server process (``(Popen, log path)`` pairs) exits first, or on timeout."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        for proc, log in procs_and_logs:
            assert proc.poll() is None, Path(log).read_text()[-3000:]
        assert time.monotonic() < deadline, "server did not come up"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)

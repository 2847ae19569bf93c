"""``jpaged serve`` flags, named as ``vllm serve`` names them.

Engine flags (``--model``, ``--max-num-seqs``, ...) come from
`jpaged.config.engine.add_engine_args`; these are the server's own.
"""

from __future__ import annotations

import argparse

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # jpaged.serve.openai.state uses the same defaults
DEFAULT_MAX_REQUEST_WORK = 1 << 22


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v} must be a positive integer")
    return n


def _positive_float(v: str) -> float:
    x = float(v)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"{v} must be a positive number of seconds")
    return x


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the --model path)")
    g.add_argument("--api-key", action="append", default=None,
                   help="accepted API key (repeatable; also env JPAGED_API_KEY)")
    g.add_argument("--chat-template", default=None,
                   help="chat template: a file path or an inline Jinja string")
    g.add_argument("--max-queue-len", type=_positive_int, default=1024,
                   help="refuse new requests (503) while this many are waiting")
    g.add_argument("--max-seqs-per-request", type=_positive_int, default=None,
                   help="most sequences (prompts x n) one request may queue "
                   "(default: --max-num-seqs)")
    g.add_argument("--max-request-work", type=_positive_int, default=DEFAULT_MAX_REQUEST_WORK,
                   help="refuse requests whose prompts x n x max_tokens x (logprobs + 2) is "
                   "over this")
    g.add_argument("--allow-client-priority", action="store_true",
                   help="honour the request's 'priority' field (otherwise it is ignored)")
    g.add_argument("--default-deadline-ms", type=_positive_float, default=None,
                   help="deadline of requests that give no deadline_ms: one still waiting "
                   "past it is refused (503), one running is cut short")
    g.add_argument("--send-timeout", type=_positive_float, default=30.0,
                   help="abort a stream whose client has not read for this many seconds")
    g.add_argument("--request-timeout", type=_positive_float, default=30.0,
                   help="seconds allowed to send a request body")
    g.add_argument("--request-head-timeout", type=_positive_float, default=10.0,
                   help="seconds allowed to send a request line and headers (also bounds "
                   "an idle keep-alive connection)")
    g.add_argument("--timeout-keep-alive", type=_positive_float, default=5.0,
                   help="close an idle keep-alive connection after this many seconds")
    g.add_argument("--limit-concurrency", type=_positive_int, default=1024,
                   help="answer 503 while this many connections or requests are open")
    g.add_argument("--tokenizer-workers", type=_positive_int, default=4,
                   help="threads that tokenize prompts and render chat templates")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let requests in flight finish after SIGTERM")
    g.add_argument("--enable-log-requests", action="store_true",
                   help="log one line per request (id, tokens, latency)")
    g.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without an API key")
    g.add_argument("--max-request-bytes", type=_positive_int,
                   default=DEFAULT_MAX_REQUEST_BYTES, help="largest request body accepted")
    g.add_argument("--max-header-bytes", type=_positive_int, default=64 << 10,
                   help="largest request head (request line and headers) accepted")
    g.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True,
                   help="serve the live dashboard at /dashboard (and its data at "
                   "/v1/engine/state), behind the same authentication")
    g.add_argument("--grpc-port", type=int, default=None,
                   help="also serve the gRPC API (jpaged.v1.Generation) on this port")
    a = p.add_argument_group("authentication")
    a.add_argument("--auth", default=None,
                   help="authenticator: api-key (the default when a key is given), oidc, "
                        "or one installed under the jpaged.auth entry point group")
    a.add_argument("--oidc-issuer", default=None, help="OIDC: the exact 'iss' expected")
    a.add_argument("--oidc-audience", default=None, help="OIDC: the 'aud' expected")
    a.add_argument("--oidc-jwks", default=None,
                   help="OIDC: the issuer's signing keys, a JWKS file or an http(s) URL")
    a.add_argument("--oidc-required-scope", default=None,
                   help="OIDC: space-separated scopes every token must grant")

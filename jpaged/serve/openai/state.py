"""What the routes share: `ServeConfig` (the server's own settings) and
`ServerState` (the engine, the tokenizer, the worker pool for tokenization and
chat templates, and the drain bookkeeping used on SIGTERM).

Tokenization and template rendering run on a worker thread (`in_pool`),
never on the event loop; errors in them that are the client's fault are
`APIError` 400s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from dataclasses import dataclass, field

from jpaged.engine.async_llm import AsyncLLM
from jpaged.serve.auth_plugins import authenticator_from_args
from jpaged.serve.logsafe import get_logger
from jpaged.serve.metrics import ServerMetrics
from jpaged.serve.openai import protocol as P
from jpaged.serve.openai.errors import APIError

logger = get_logger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_REQUEST_WORK = 1 << 22


@dataclass
class ServeConfig:
    """The server's own settings (``jpaged serve`` flags of the same names).

    ``max_seqs_per_request`` caps prompts x n of one request (None: the
    engine's ``max_num_seqs``); ``max_request_work`` caps prompts x n x
    max_tokens x (logprobs + 2 when logprobs are asked); ``send_timeout`` is
    how long a stream may wait on a client that does not read before it is
    aborted; ``request_body_timeout`` bounds reading a request body.
    Prompts are tokenized and chat templates rendered on
    ``tokenizer_workers`` threads: a client's prompt waits only while that
    many others are in progress, and one longer than max_model_len tokens
    could cover is refused from its length alone, untokenized.
    """

    served_model_names: list[str]
    model_path: str = ""
    api_keys: list[str] = field(default_factory=list)
    chat_template: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    shutdown_timeout: float = 30.0
    enable_log_requests: bool = False
    metrics_public: bool = False
    max_seqs_per_request: int | None = None
    max_request_work: int = DEFAULT_MAX_REQUEST_WORK
    allow_client_priority: bool = False
    send_timeout: float = 30.0
    request_body_timeout: float = 30.0
    tokenizer_workers: int = 4
    default_deadline_ms: float | None = None  # for requests without deadline_ms
    # An authenticator (`jpaged.serve.auth_plugins`); None: API keys, if any.
    auth: object | None = None
    grpc_port: int | None = None
    dashboard: bool = True  # GET /dashboard and /v1/engine/state


def serve_config_from_args(args) -> ServeConfig:
    keys = list(args.api_key or [])
    env_key = os.environ.get("JPAGED_API_KEY")
    if env_key:
        keys.append(env_key)
    template = args.chat_template
    if template is not None and os.path.isfile(template):
        with open(template) as f:
            template = f.read()
    model_path = args.model or ""
    names = list(args.served_model_name or []) or [model_path or "jpaged-demo"]
    return ServeConfig(served_model_names=names, model_path=model_path, api_keys=keys,
                       chat_template=template, max_request_bytes=args.max_request_bytes,
                       shutdown_timeout=args.shutdown_timeout,
                       enable_log_requests=args.enable_log_requests,
                       metrics_public=args.metrics_public,
                       max_seqs_per_request=args.max_seqs_per_request,
                       max_request_work=args.max_request_work,
                       allow_client_priority=args.allow_client_priority,
                       default_deadline_ms=getattr(args, "default_deadline_ms", None),
                       send_timeout=args.send_timeout,
                       request_body_timeout=args.request_timeout,
                       tokenizer_workers=args.tokenizer_workers,
                       auth=authenticator_from_args(args, keys),
                       grpc_port=getattr(args, "grpc_port", None),
                       dashboard=getattr(args, "dashboard", True))


class ServerState:
    def __init__(self, llm: AsyncLLM, cfg: ServeConfig, metrics: ServerMetrics):
        self.llm, self.cfg, self.metrics = llm, cfg, metrics
        engine = llm.engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.max_seqs_per_request = cfg.max_seqs_per_request or \
            getattr(getattr(engine, "config", None), "max_num_seqs", 256)
        # Tokenizers release the GIL while they encode, so several workers
        # let a huge prompt take one of them while others' prompts go on.
        self.pool = concurrent.futures.ThreadPoolExecutor(
            cfg.tokenizer_workers, thread_name_prefix="jpaged-tok")
        # Building big responses (logprobs) and encoding them runs here, off
        # the event loop, so /health and other streams keep being served.
        self.build_pool = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="jpaged-build")
        self.max_token_chars = _max_token_chars(self.tokenizer)
        self.draining = False
        self.drain_deadline = 0.0
        self.inflight = 0
        self.active: set[str] = set()  # engine request ids being served
        self.server = None  # the uvicorn.Server, when run by run_server
        self.auth = None  # the authenticator build_app chose (shared with gRPC)
        self.openapi: dict | None = None  # /openapi.json, built on first request

    async def in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def read(self, request, cls):
        """The request body as ``cls`` (`protocol.read_model` under this
        server's size and time limits)."""
        return await P.read_model(request, cls, self.cfg.max_request_bytes,
                                  self.cfg.request_body_timeout)

    async def build(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.build_pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.build_pool.shutdown(wait=False)

    def check_fanout(self, num_prompts: int, n: int, max_tokens: int | None,
                     logprobs: int | None, prompt_lens: list[int] | None = None) -> None:
        """Refuse a request that would queue too many sequences or build too
        big a response (400 naming the limit)."""
        seqs = num_prompts * n
        if seqs > self.max_seqs_per_request:
            raise APIError(400, f"prompts x n = {num_prompts} x {n} = {seqs} sequences is over "
                           f"the limit of {self.max_seqs_per_request} per request "
                           "(max_seqs_per_request)", "n")
        if max_tokens is None:
            shortest = min(prompt_lens) if prompt_lens else 0
            max_tokens = max(1, self.max_model_len - shortest)
        factor = 1 if logprobs is None else logprobs + 2
        work = seqs * max_tokens * factor
        if work > self.cfg.max_request_work:
            raise APIError(400, f"prompts x n x max_tokens x (logprobs + 2) = {work} is over "
                           f"max_request_work={self.cfg.max_request_work}; lower n, "
                           "max_tokens or logprobs", "max_tokens")

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.cfg.served_model_names:
            return self.cfg.served_model_names[0] if name is None else name
        raise APIError(404, f"The model `{name[:200]}` does not exist.", "model")

    def token_str(self, tid: int, lp) -> str:
        """A token's text for logprobs: the engine's decoding, else the tokenizer's."""
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([tid])

    def check_length(self, num_chars: int, param: str = "prompt") -> None:
        """Refuse, before tokenizing, a text that cannot fit in max_model_len:
        no token covers more than ``max_token_chars`` characters, so a text
        longer than that many per allowed token has too many tokens."""
        bound = self.max_model_len * self.max_token_chars
        if self.max_token_chars and num_chars > bound:
            raise APIError(400, f"{param} is {num_chars} characters, more than max_model_len="
                           f"{self.max_model_len} tokens can hold ({self.max_token_chars} "
                           "characters per token at most)", param)

    # Tokenization (worker thread).
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not text:
            raise APIError(400, "prompt is empty", "prompt")
        self.check_length(len(text))
        limit = self.max_model_len
        head_len = 8 * limit + 1024
        if len(text) > head_len:  # reject huge prompts without tokenizing all of them
            head = self.tokenizer(text[:head_len], add_special_tokens=add_special_tokens)
            if len(head.input_ids) > limit + 16:
                raise APIError(400, f"prompt has more than {limit} tokens, over "
                               f"max_model_len={limit}", "prompt")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise APIError(400, "prompt is empty", param)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise APIError(400, f"token id {i} is outside the vocabulary "
                               f"[0, {self.vocab_size})", param)
        return ids

    def render_chat(self, messages: list[P.ChatMessage], add_generation_prompt: bool,
                    continue_final_message: bool = False) -> str:
        from jpaged.tokenizer import apply_chat_template

        msgs = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, "only text content parts are supported",
                                       "messages")
                    parts.append(part["text"])
                content = "".join(parts)
            msg = {"role": m.role, "content": content or ""}
            if m.name is not None:
                msg["name"] = m.name
            msgs.append(msg)
        if not msgs:
            raise APIError(400, "messages is empty", "messages")
        try:
            kw = {"continue_final_message": True} if continue_final_message else {}
            return apply_chat_template(self.tokenizer, msgs,
                                       add_generation_prompt=add_generation_prompt and
                                       not continue_final_message,
                                       chat_template=self.cfg.chat_template, **kw)
        except APIError:
            raise
        except Exception as e:
            raise _template_error(e) from None


def _max_token_chars(tokenizer) -> int:
    """The most characters one token stands for (0 if unknown): the longest
    vocabulary entry, as stored (byte-level pieces count one character per
    byte, so this bounds the decoded text of a token from above)."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - no vocabulary to read: no length bound
        return 0
    # Normalizers may fold characters (NFKC); twice the longest piece is a
    # safe bound for those.
    return 2 * max((len(p) for p in vocab), default=0)


def _template_error(e: Exception) -> APIError:
    """A 400 when the messages made the template fail (its own raise_exception,
    a sandbox violation, a missing field); a 500 when the server's template
    machinery is at fault (jinja2 missing, a template that does not parse)."""
    try:
        import jinja2
        client_fault = (jinja2.TemplateError, ValueError, TypeError, KeyError)
        server_fault = isinstance(e, jinja2.TemplateSyntaxError)
    except ImportError:
        client_fault, server_fault = (), True
    if server_fault or not isinstance(e, client_fault):
        logger.error("chat template machinery failed: %r", e)
        return APIError(500, f"chat template could not run: {type(e).__name__}: {e}")
    return APIError(400, f"chat template failed: {e}", "messages")

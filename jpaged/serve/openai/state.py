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
import logging
import os
from dataclasses import dataclass, field

from jpaged.engine.async_llm import AsyncLLM
from jpaged.serve.metrics import ServerMetrics
from jpaged.serve.openai import protocol as P
from jpaged.serve.openai.errors import APIError

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1 << 20


@dataclass
class ServeConfig:
    served_model_names: list[str]
    model_path: str = ""
    api_keys: list[str] = field(default_factory=list)
    chat_template: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    shutdown_timeout: float = 30.0
    enable_log_requests: bool = False
    metrics_public: bool = False


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
                       metrics_public=args.metrics_public)


class ServerState:
    def __init__(self, llm: AsyncLLM, cfg: ServeConfig, metrics: ServerMetrics):
        self.llm, self.cfg, self.metrics = llm, cfg, metrics
        engine = llm.engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jpaged-tok")
        self.draining = False
        self.drain_deadline = 0.0
        self.inflight = 0
        self.active: set[str] = set()  # engine request ids being served
        self.server = None  # the uvicorn.Server, when run by run_server

    async def in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.cfg.served_model_names:
            return self.cfg.served_model_names[0] if name is None else name
        raise APIError(404, f"The model `{name[:200]}` does not exist.", "model")

    def token_str(self, tid: int, lp) -> str:
        """A token's text for logprobs: the engine's decoding, else the tokenizer's."""
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([tid])

    # Tokenization (worker thread).
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not text:
            raise APIError(400, "prompt is empty", "prompt")
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

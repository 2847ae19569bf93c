"""The OpenAI-compatible HTTP server: a Starlette app on an `AsyncLLM`.

The life of a request:

1. `APIKeyMiddleware` checks the key (route from ``scope["path"]``), then
   `_DrainMiddleware` refuses new generation work with 503 while the server
   is shutting down and counts the requests in flight.
2. The route reads the body under ``max_request_bytes`` and validates it with
   the pydantic models of `protocol`; any failure is a 400 in OpenAI's error
   shape (never 422). Unknown fields are logged and ignored.
3. Prompts are rendered (chat template, transformers' sandbox) and tokenized
   on a worker thread, then submitted to `AsyncLLM`; the engine's
   `ValueError`s become 400s, a full waiting queue a 503 with Retry-After.
4. Non-streaming requests wait for the final output while watching for
   ``http.disconnect``; streaming ones are sent as Server-Sent Events by
   `_SSEResponse`, which also watches for the disconnect. Either way a client
   that goes away aborts its requests, and the engine frees their blocks.
5. On SIGTERM the server answers new work with 503, waits up to
   ``shutdown_timeout`` for requests in flight, aborts the rest, and exits.

Tested end to end with uvicorn on 127.0.0.1 and the official ``openai``
client (tests/test_server*.py). The file is long because it is the whole
OpenAI surface (both endpoints with their stream and non-stream shapes);
the generation plumbing lives in `jpaged.serve.streams`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jpaged.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from jpaged.sampling_params import SamplingParams
from jpaged.serve import protocol as P
from jpaged.serve.auth import APIKeyMiddleware
from jpaged.serve.metrics import ServerMetrics
from jpaged.serve.streams import (ClientGone, Generation, SSEResponse, error_chunk,
                                  run_until_disconnect, sse)

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
MAX_PROMPTS_PER_REQUEST = 256
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowed", 413: "BadRequestError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}


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


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(
        message=message[:2000], type=_ERROR_TYPES.get(status, "Error"), param=param,
        code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ------------------------------------------------------------------ state
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
        except Exception as e:  # template errors (including sandbox violations)
            raise APIError(400, f"chat template failed: {e}", "messages") from None


# ---------------------------------------------------------------- parsing
async def read_model(request: Request, cls, state: ServerState):
    limit = state.cfg.max_request_bytes
    cl = request.headers.get("content-length")
    if cl is not None and (not cl.isdigit() or int(cl) > limit):
        raise APIError(413, f"request body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over {limit} bytes")
        chunks.append(chunk)
    try:
        obj = cls.model_validate_json(b"".join(chunks))
    except ValidationError as e:
        err = e.errors(include_input=False, include_url=False)[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        param = str(err["loc"][0]) if err.get("loc") else None
        raise APIError(400, f"{loc + ': ' if loc else ''}{err.get('msg', 'invalid')}"[:1000],
                       param) from None
    except Exception as e:  # noqa: BLE001 - anything odd in the body is a 400
        raise APIError(400, f"invalid request body: {type(e).__name__}") from None
    extra = sorted((obj.model_extra or {}).keys())
    if extra:
        logger.warning("ignoring unknown fields: %s", ", ".join(k[:64] for k in extra[:10]))
    return obj


def _param_of(msg: str) -> str | None:
    head = msg.split("=", 1)[0]
    return head if head.isidentifier() else None


def make_sampling_params(req, state: ServerState, max_tokens, logprobs) -> SamplingParams:
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    top_k = req.top_k if req.top_k is not None else 0
    if top_k >= state.vocab_size:
        top_k = 0  # the whole vocabulary: no filter
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else
            req.repetition_penalty,
            seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos, stop=req.stop, stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens)
    except ValueError as e:
        raise APIError(400, str(e), _param_of(str(e))) from None


# ----------------------------------------------------------------- routes
def _state(request: Request) -> ServerState:
    return request.app.state.jpaged


async def health(request: Request):
    st = _state(request)
    if not st.llm.is_running:
        return error_response(503, f"engine is not running: {st.llm.errored!r}")
    if st.draining:
        return error_response(503, "server is shutting down", headers={"Retry-After": "5"})
    return Response(status_code=200)


async def version(request: Request):
    import jpaged

    return JSONResponse({"version": jpaged.__version__})


async def models(request: Request):
    st = _state(request)
    return JSONResponse(P.ModelList(data=[
        P.ModelCard(id=n, root=st.cfg.model_path, max_model_len=st.max_model_len)
        for n in st.cfg.served_model_names]).model_dump())


async def metrics_endpoint(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(_state(request).metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)


async def tokenize(request: Request):
    st = _state(request)
    req = await read_model(request, P.TokenizeRequest, st)
    st.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    if req.messages is not None:
        text = await st.in_pool(st.render_chat, req.messages, req.add_generation_prompt)
        ids = await st.in_pool(st.tokenize, text, False)
    else:
        ids = await st.in_pool(st.tokenize, req.prompt, req.add_special_tokens)
    return JSONResponse(P.TokenizeResponse(count=len(ids), max_model_len=st.max_model_len,
                                           tokens=ids).model_dump())


async def detokenize(request: Request):
    st = _state(request)
    req = await read_model(request, P.DetokenizeRequest, st)
    st.check_model(req.model)
    ids = st.check_ids(req.tokens, "tokens") if req.tokens else []
    text = await st.in_pool(st.tokenizer.decode, ids)
    return JSONResponse(P.DetokenizeResponse(prompt=text).model_dump())


def _stream_opts(req) -> tuple[bool, bool]:
    so = req.stream_options
    if so is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    return bool(so and so.include_usage), bool(so and so.continuous_usage_stats)


async def completions(request: Request):
    st = _state(request)
    req = await read_model(request, P.CompletionRequest, st)
    model = st.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported", "best_of")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (no prompt logprobs)", "echo")
    include_usage, _ = _stream_opts(req)
    raw = req.prompt
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise APIError(400, "prompt is empty", "prompt")
    if len(raw) > MAX_PROMPTS_PER_REQUEST:
        raise APIError(400, f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request", "prompt")
    prompts, texts = [], []
    for p in raw:
        if isinstance(p, str):
            prompts.append(await st.in_pool(st.tokenize, p, True))
            texts.append(p)
        else:
            prompts.append(st.check_ids(list(p)))
            texts.append(None)
    params = make_sampling_params(req, st, req.max_tokens, req.logprobs)
    gen = Generation(st, f"cmpl-{uuid.uuid4().hex}", prompts, params, req.priority,
                      "delta" if req.stream else "cumulative")
    await _submit(gen)
    if req.echo:
        for i, t in enumerate(texts):
            if t is None:
                texts[i] = await st.in_pool(st.tokenizer.decode, prompts[i])
    n = params.n
    if req.stream:
        chunks = _completion_chunks(gen, model, texts if req.echo else None, include_usage,
                                    req.logprobs)
        return SSEResponse(_guarded_stream(gen, chunks), gen.close)
    try:
        finals = await run_until_disconnect(request, _collect(gen))
    except ClientGone:
        return Response(status_code=499)
    finally:
        gen.close()
    choices, usage = [], P.UsageInfo()
    for i, out in enumerate(finals):
        usage.prompt_tokens += len(prompts[i])
        for o in out.outputs:
            usage.completion_tokens += len(o.token_ids)
            prefix = texts[i] if req.echo else ""
            choices.append(P.CompletionChoice(
                index=i * n + o.index, text=prefix + o.text,
                logprobs=_completion_logprobs(st, o.token_ids, o.logprobs, 0)
                if req.logprobs is not None else None,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return JSONResponse(P.CompletionResponse(id=gen.base_id, model=model, choices=choices,
                                             usage=usage).model_dump())


async def _submit(gen: Generation) -> None:
    try:
        await gen.submit()
    except QueueFullError as e:
        raise APIError(503, str(e), headers={"Retry-After": "1"}) from None
    except EngineDeadError as e:
        raise APIError(503, str(e)) from None
    except ValueError as e:
        raise APIError(400, str(e), _param_of(str(e))) from None


async def _collect(gen: Generation) -> list:
    finals = [None] * len(gen.prompts)
    async for i, out in gen.outputs():
        finals[i] = out
    for out in finals:
        for o in out.outputs:
            gen.completion_tokens += len(o.token_ids)
            gen.finish_reasons.append(o.finish_reason)
    if any(f is None or not f.finished for f in finals):
        raise EngineDeadError("generation ended without a final output")
    return finals


def _token_str(st: ServerState, tid: int, lp) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return st.tokenizer.decode([tid])


def _completion_logprobs(st, token_ids, logprobs, offset: int) -> P.CompletionLogprobs:
    res = P.CompletionLogprobs()
    for tid, entry in zip(token_ids, logprobs or []):
        lp = entry.get(tid)
        tok = _token_str(st, tid, lp)
        res.tokens.append(tok)
        res.token_logprobs.append(lp.logprob if lp else None)
        res.top_logprobs.append({_token_str(st, t, v): v.logprob for t, v in entry.items()})
        res.text_offset.append(offset)
        offset += len(tok)
    return res


def _chat_logprobs(st, token_ids, logprobs, top_n: int) -> P.ChatLogprobs:
    content = []
    for tid, entry in zip(token_ids, logprobs or []):
        lp = entry.get(tid)
        tok = _token_str(st, tid, lp)
        tops = sorted(((v.rank or 0, t, v) for t, v in entry.items() if t != tid or
                       (v.rank or 0) <= top_n), key=lambda x: x[0])
        top = [P.TopLogprob(token=_token_str(st, t, v), logprob=v.logprob,
                            bytes=list(_token_str(st, t, v).encode()))
               for r, t, v in tops if 1 <= r <= top_n]
        content.append(P.ChatTokenLogprob(token=tok, logprob=lp.logprob if lp else 0.0,
                                          bytes=list(tok.encode()), top_logprobs=top))
    return P.ChatLogprobs(content=content)


def _usage(gen: Generation, prompt_tokens: int) -> P.UsageInfo:
    return P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=gen.completion_tokens,
                       total_tokens=prompt_tokens + gen.completion_tokens)


async def _guarded_stream(gen: Generation, chunks):
    """SSE chunks, then ``[DONE]``; a failure after the stream started is sent
    in-band as an error chunk before ``[DONE]``."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
        logger.warning("stream %s failed: %r", gen.base_id, e)
        yield error_chunk(e)
    yield "data: [DONE]\n\n"


async def _completion_chunks(gen: Generation, model: str, echo_texts, include_usage: bool,
                             logprobs):
    st, n = gen.state, gen.params.n
    offsets: dict[int, int] = {}
    prompt_tokens = sum(map(len, gen.prompts))
    async for i, out in gen.outputs():
        choices = []
        for o in out.outputs:
            idx = i * n + o.index
            text = o.text
            if echo_texts is not None and idx not in offsets:
                text = echo_texts[i] + text
            off = offsets.get(idx, 0)
            offsets[idx] = off + len(text)
            gen.completion_tokens += len(o.token_ids)
            if o.finish_reason is not None:
                gen.finish_reasons.append(o.finish_reason)
            if not text and not o.token_ids and o.finish_reason is None:
                continue
            choices.append(P.CompletionChoice(
                index=idx, text=text, finish_reason=o.finish_reason,
                stop_reason=o.stop_reason,
                logprobs=_completion_logprobs(st, o.token_ids, o.logprobs, off)
                if logprobs is not None else None))
        if choices:
            yield sse(P.CompletionResponse(id=gen.base_id, model=model, choices=choices))
    if include_usage:
        yield sse(P.CompletionResponse(id=gen.base_id, model=model, choices=[],
                                        usage=_usage(gen, prompt_tokens)))


async def chat_completions(request: Request):
    st = _state(request)
    req = await read_model(request, P.ChatCompletionRequest, st)
    model = st.check_model(req.model)
    include_usage, _ = _stream_opts(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    text = await st.in_pool(st.render_chat, req.messages, req.add_generation_prompt,
                            req.continue_final_message)
    ids = await st.in_pool(st.tokenize, text, False)
    if max_tokens is None and len(ids) >= st.max_model_len:
        raise APIError(400, f"prompt has {len(ids)} tokens, no room under "
                       f"max_model_len={st.max_model_len}", "messages")
    params = make_sampling_params(req, st, max_tokens, logprobs)
    gen = Generation(st, f"chatcmpl-{uuid.uuid4().hex}", [ids], params, req.priority,
                      "delta" if req.stream else "cumulative")
    await _submit(gen)
    if req.stream:
        return SSEResponse(
            _guarded_stream(gen, _chat_chunks(gen, model, include_usage, logprobs)), gen.close)
    try:
        finals = await run_until_disconnect(request, _collect(gen))
    except ClientGone:
        return Response(status_code=499)
    finally:
        gen.close()
    out = finals[0]
    choices = [P.ChatChoice(
        index=o.index, message=P.ChatResponseMessage(content=o.text),
        logprobs=_chat_logprobs(st, o.token_ids, o.logprobs, logprobs)
        if logprobs is not None else None,
        finish_reason=o.finish_reason, stop_reason=o.stop_reason) for o in out.outputs]
    n_out = sum(len(o.token_ids) for o in out.outputs)
    usage = P.UsageInfo(prompt_tokens=len(ids), completion_tokens=n_out,
                        total_tokens=len(ids) + n_out)
    return JSONResponse(P.ChatCompletionResponse(id=gen.base_id, model=model, choices=choices,
                                                 usage=usage).model_dump())


async def _chat_chunks(gen: Generation, model: str, include_usage: bool, logprobs):
    st = gen.state
    prompt_tokens = len(gen.prompts[0])
    for k in range(gen.params.n):
        yield sse(P.ChatCompletionChunk(id=gen.base_id, model=model, choices=[
            P.ChatChunkChoice(index=k, delta=P.DeltaMessage(role="assistant",
                                                            content=""))]))
    async for _, out in gen.outputs():
        choices = []
        for o in out.outputs:
            gen.completion_tokens += len(o.token_ids)
            if o.finish_reason is not None:
                gen.finish_reasons.append(o.finish_reason)
            if not o.text and not o.token_ids and o.finish_reason is None:
                continue
            choices.append(P.ChatChunkChoice(
                index=o.index, delta=P.DeltaMessage(content=o.text),
                finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                logprobs=_chat_logprobs(st, o.token_ids, o.logprobs, logprobs)
                if logprobs is not None else None))
        if choices:
            yield sse(P.ChatCompletionChunk(id=gen.base_id, model=model, choices=choices))
    if include_usage:
        yield sse(P.ChatCompletionChunk(id=gen.base_id, model=model, choices=[],
                                         usage=_usage(gen, prompt_tokens)))


# ------------------------------------------------------------ the app
def _wrap(handler):
    async def endpoint(request: Request):
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e.status, e.message, e.param, e.headers)
        except EngineDeadError as e:
            return error_response(503, str(e))
        except ValueError as e:
            return error_response(400, str(e), _param_of(str(e)))
    return endpoint


async def _http_error(request: Request, exc: HTTPException):
    return error_response(exc.status_code, exc.detail or "error", headers=exc.headers)


async def _server_error(request: Request, exc: Exception):
    logger.exception("unhandled error on %s", request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}")


class _DrainMiddleware:
    """Refuse new generation work while draining; count requests in flight."""

    WORK = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.WORK:
            return await self.app(scope, receive, send)
        if self.state.draining:
            resp = error_response(503, "server is shutting down", headers={"Retry-After": "5"})
            return await resp(scope, receive, send)
        self.state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1


def build_app(llm: AsyncLLM, cfg: ServeConfig, metrics: ServerMetrics | None = None):
    """The Starlette app (wrapped in the drain and API-key middlewares)."""
    metrics = metrics or ServerMetrics(cfg.served_model_names[0])
    if metrics not in llm.stat_loggers:
        llm.stat_loggers.append(metrics)
    state = ServerState(llm, cfg, metrics)
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/tokenize", _wrap(tokenize), methods=["POST"]),
        Route("/detokenize", _wrap(detokenize), methods=["POST"]),
        Route("/v1/completions", _wrap(completions), methods=["POST"]),
        Route("/v1/chat/completions", _wrap(chat_completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error,
                                                       Exception: _server_error})
    app.state.jpaged = state
    public = {"/health"} | ({"/metrics"} if cfg.metrics_public else set())
    outer = APIKeyMiddleware(_DrainMiddleware(app, state), cfg.api_keys, public)
    outer.state = state  # for run_server and tests
    return outer


# ------------------------------------------------------------- running
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


async def _drain_watch(state: ServerState, poll: float = 0.05) -> None:
    """After SIGTERM: wait for requests in flight (up to the deadline), abort
    the rest, then tell uvicorn to exit."""
    while not state.draining:
        await asyncio.sleep(poll)
    logger.warning("shutting down: %d requests in flight, waiting up to %.1fs",
                   state.inflight, state.cfg.shutdown_timeout)
    while state.inflight and time.monotonic() < state.drain_deadline:
        await asyncio.sleep(poll)
    if state.inflight:
        logger.warning("shutdown timeout: aborting %d requests", len(state.active))
        for rid in list(state.active):
            state.llm.abort(rid)
        end = time.monotonic() + 2.0
        while state.inflight and time.monotonic() < end:
            await asyncio.sleep(poll)
    if state.server is not None:
        state.server.should_exit = True


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000,
                   max_header_bytes: int = 64 << 10, log_level: str = "warning"):
    """uvicorn settings: h11 (whose request head size is bounded), no lifespan."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http="h11", lifespan="off",
                          h11_max_incomplete_event_size=max_header_bytes, server_header=False,
                          timeout_graceful_shutdown=5, log_level=log_level)


def run_server(args) -> int:
    """Build the engine and serve until SIGTERM/SIGINT (the ``jpaged serve`` command)."""
    import uvicorn

    from jpaged.config.engine import engine_config_from_args
    from jpaged.engine.llm_engine import LLMEngine

    cfg = serve_config_from_args(args)
    if cfg.enable_log_requests:
        logging.getLogger("jpaged.serve.requests").setLevel(logging.INFO)
    engine = LLMEngine(engine_config_from_args(args))
    llm = AsyncLLM(engine, max_queue_len=args.max_queue_len)
    app = build_app(llm, cfg)
    state: ServerState = app.state

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                return super().handle_exit(sig, frame)
            state.drain_deadline = time.monotonic() + cfg.shutdown_timeout
            state.draining = True

    server = _Server(uvicorn_config(app, args.host, args.port, args.max_header_bytes,
                                    args.uvicorn_log_level))
    state.server = server

    async def main():
        watch = asyncio.ensure_future(_drain_watch(state))
        try:
            await server.serve()
        finally:
            watch.cancel()

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()
        state.pool.shutdown(wait=False)
    return 0

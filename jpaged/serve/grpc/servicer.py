"""``jpaged.v1.Generation`` on an `AsyncLLM`: Generate, Tokenize, ModelInfo.

A ``Generate`` call tokenizes its prompt on a worker thread, submits one
engine request (``n`` samples in it) with delta outputs, and writes one
`GenerateResponse` per engine output (``stream: true``) or one at the end.
A cancelled call or an expired deadline cancels the handler task; the
`RequestStream` it was reading is then closed, which aborts the request and
frees its blocks. Errors map to status codes: a bad request
``INVALID_ARGUMENT``, a full waiting queue ``RESOURCE_EXHAUSTED``, a dead
engine or a draining server ``UNAVAILABLE``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import uuid

import grpc

from jpaged.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from jpaged.sampling_params import SamplingParams
from jpaged.serve.grpc.stubs import pb2

logger = logging.getLogger(__name__)


def sampling_params(p, vocab_size: int) -> SamplingParams:
    """`SamplingParams` from the proto message; unset fields keep the defaults."""
    kw = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "n"):
        if p.HasField(name):
            kw[name] = getattr(p, name)
    if kw.get("top_k", 0) >= vocab_size:
        kw["top_k"] = 0  # the whole vocabulary: no filter (as the REST API does)
    if p.stop:
        kw["stop"] = list(p.stop)
    return SamplingParams(ignore_eos=p.ignore_eos, **kw)


def _choices(out) -> list:
    """The samples with something new in this (delta) output."""
    return [pb2.Choice(index=o.index, text=o.text, token_ids=o.token_ids,
                       finish_reason=o.finish_reason or "")
            for o in out.outputs if o.text or o.token_ids or o.finish_reason]


def _usage(ids: list[int], tokens: dict[int, list[int]]):
    return pb2.Usage(prompt_tokens=len(ids), completion_tokens=sum(map(len, tokens.values())))


class GenerationServicer:
    """The service's three methods (see the module docstring).

    Args:
        llm: the engine, shared with the HTTP API.
        served_model_name: the name ModelInfo reports.
        is_draining: returns True while the server shuts down (new calls get
            ``UNAVAILABLE``).
        metrics: a `ServerMetrics` whose ``on_abort`` counts cancelled calls.
    """

    def __init__(self, llm: AsyncLLM, served_model_name: str, is_draining=lambda: False,
                 metrics=None):
        self.llm, self.served_model_name = llm, served_model_name
        self.is_draining, self.metrics = is_draining, metrics
        engine = llm.engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jpaged-grpc")
        self.inflight = 0  # Generate calls running
        self.active: set[str] = set()  # their engine request ids

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        limit = self.max_model_len
        head_len = 8 * limit + 1024
        if len(text) > head_len:  # refuse huge prompts without tokenizing all of them
            head = self.tokenizer(text[:head_len], add_special_tokens=add_special_tokens)
            if len(head.input_ids) > limit + 16:
                raise ValueError(f"prompt has more than {limit} tokens, over "
                                 f"max_model_len={limit}")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    async def _prompt_ids(self, request) -> list[int]:
        which = request.WhichOneof("input")
        if which == "prompt":
            if not request.prompt:
                raise ValueError("prompt='' is empty")
            return await self._in_pool(self._tokenize, request.prompt)
        if which != "prompt_token_ids" or not request.prompt_token_ids.ids:
            raise ValueError("prompt: set prompt or prompt_token_ids (non-empty)")
        ids = list(request.prompt_token_ids.ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"prompt_token_ids: token id {i} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        return ids

    async def Generate(self, request, context):  # noqa: N802 - the proto's name
        if self.is_draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        self.inflight += 1
        rid = f"grpc-{uuid.uuid4().hex}"
        reply_id = request.request_id or rid
        stream = None
        try:
            try:
                ids = await self._prompt_ids(request)
                params = sampling_params(request.params, self.vocab_size)
                stream = await self.llm.add_request(
                    rid, {"prompt_token_ids": ids}, params, priority=request.priority,
                    output_kind="delta")
            except QueueFullError as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except EngineDeadError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:2000])
            self.active.add(rid)
            texts: dict[int, list[str]] = {}
            tokens: dict[int, list[int]] = {}
            reasons: dict[int, str] = {}
            try:
                async for out in stream:
                    for o in out.outputs:
                        texts.setdefault(o.index, []).append(o.text)
                        tokens.setdefault(o.index, []).extend(o.token_ids)
                        if o.finish_reason:
                            reasons[o.index] = o.finish_reason
                    if request.stream:
                        msg = pb2.GenerateResponse(request_id=reply_id,
                                                   choices=_choices(out))
                        if out.finished:
                            msg.usage.CopyFrom(_usage(ids, tokens))
                        if msg.choices or out.finished:
                            yield msg
            except EngineDeadError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            if not request.stream:
                yield pb2.GenerateResponse(
                    request_id=reply_id,
                    choices=[pb2.Choice(index=i, text="".join(texts[i]), token_ids=tokens[i],
                                        finish_reason=reasons.get(i, "abort"))
                             for i in sorted(texts)],
                    usage=_usage(ids, tokens))
        finally:
            self.inflight -= 1
            self.active.discard(rid)
            if stream is not None and not stream.finished:
                stream.close()  # cancelled or deadline passed: abort, free the blocks
                if self.metrics is not None:
                    self.metrics.on_abort(rid)

    async def Tokenize(self, request, context):  # noqa: N802
        if not request.text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text='' is empty")
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        try:
            ids = await self._in_pool(self._tokenize, request.text, add)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:2000])
        return pb2.TokenizeResponse(token_ids=ids, count=len(ids))

    async def ModelInfo(self, request, context):  # noqa: N802
        return pb2.ModelInfoResponse(served_model_name=self.served_model_name,
                                     max_model_len=self.max_model_len,
                                     vocab_size=self.vocab_size)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, for ``server.add_generic_rpc_handlers``."""
        def codec(req, resp):
            return dict(request_deserializer=req.FromString,
                        response_serializer=resp.SerializeToString)

        return grpc.method_handlers_generic_handler("jpaged.v1.Generation", {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, **codec(pb2.GenerateRequest, pb2.GenerateResponse)),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self.Tokenize, **codec(pb2.TokenizeRequest, pb2.TokenizeResponse)),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self.ModelInfo, **codec(pb2.ModelInfoRequest, pb2.ModelInfoResponse)),
        })

"""``jpaged.v1.Generation`` on an `AsyncLLM`: Generate, Tokenize, ModelInfo.

The servicer shares the HTTP server's `ServerState`: the same tokenizer
workers and length checks, the same fan-out and work limits, the same
client-priority policy, the same drain bookkeeping (``inflight`` and
``active``, so SIGTERM waits for and aborts gRPC calls too), and the same
per-principal prefix-cache salt (the authenticated subject, which
`AuthInterceptor` leaves in `PRINCIPAL`). A ``Generate`` call tokenizes its
prompt on a worker thread, submits one engine request (``n`` samples in it)
with delta outputs, and writes one `GenerateResponse` per engine output
(``stream: true``) or one at the end.
A cancelled call or an expired deadline cancels the handler task; the
`RequestStream` it was reading is then closed, which aborts the request and
frees its blocks. Errors map to status codes: a bad request
``INVALID_ARGUMENT``, a full waiting queue ``RESOURCE_EXHAUSTED``, a dead
engine or a draining server ``UNAVAILABLE``.
"""

from __future__ import annotations

import contextvars
import logging
import uuid

import grpc

from jpaged.engine.async_llm import EngineDeadError, QueueFullError
from jpaged.sampling_params import SamplingParams
from jpaged.serve.grpc.stubs import pb2
from jpaged.serve.openai.errors import APIError
from jpaged.serve.openai.state import ServerState

logger = logging.getLogger(__name__)

# The authenticated subject of the call being served (set per call by the
# auth interceptor's wrapper; None without authentication).
PRINCIPAL: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jpaged_grpc_principal", default=None)

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE}


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
        state: the HTTP server's `ServerState` (engine, limits, drain state).
        is_draining: returns True while the server shuts down (new calls get
            ``UNAVAILABLE``).
    """

    def __init__(self, state: ServerState, is_draining=None):
        self.state, self.llm = state, state.llm
        self.is_draining = is_draining or (lambda: state.draining)

    async def _prompt_ids(self, request) -> list[int]:
        st = self.state
        which = request.WhichOneof("input")
        if which == "prompt":
            return await st.in_pool(st.tokenize, request.prompt, True)
        if which == "prompt_token_ids":
            return st.check_ids(list(request.prompt_token_ids.ids), "prompt_token_ids")
        raise APIError(400, "set prompt or prompt_token_ids", "prompt")

    async def _submit(self, rid: str, request):
        st = self.state
        ids = await self._prompt_ids(request)
        params = sampling_params(request.params, st.vocab_size)
        st.check_fanout(1, params.n, params.max_tokens, None, [len(ids)])
        priority = request.priority if st.cfg.allow_client_priority else 0
        stream = await self.llm.add_request(rid, {"prompt_token_ids": ids}, params,
                                            priority=priority, cache_salt=PRINCIPAL.get(),
                                            output_kind="delta")
        return ids, stream

    async def Generate(self, request, context):  # noqa: N802 - the proto's name
        if self.is_draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        st = self.state
        st.inflight += 1
        rid = f"grpc-{uuid.uuid4().hex}"
        reply_id = request.request_id or rid
        stream = None
        try:
            try:
                ids, stream = await self._submit(rid, request)
            except APIError as e:
                await context.abort(_CODES.get(e.status, grpc.StatusCode.INTERNAL),
                                    e.message)
            except QueueFullError as e:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except EngineDeadError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:2000])
            st.active.add(rid)
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
            st.inflight -= 1
            st.active.discard(rid)
            if stream is not None:
                stream.close()  # cancelled or deadline passed: abort, free the blocks

    async def Tokenize(self, request, context):  # noqa: N802
        st = self.state
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        try:
            ids = await st.in_pool(st.tokenize, request.text, add)
        except APIError as e:
            await context.abort(_CODES.get(e.status, grpc.StatusCode.INTERNAL), e.message)
        return pb2.TokenizeResponse(token_ids=ids, count=len(ids))

    async def ModelInfo(self, request, context):  # noqa: N802
        st = self.state
        return pb2.ModelInfoResponse(served_model_name=st.cfg.served_model_names[0],
                                     max_model_len=st.max_model_len,
                                     vocab_size=st.vocab_size)

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

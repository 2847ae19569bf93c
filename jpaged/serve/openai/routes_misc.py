"""The small routes: ``/health``, ``/version``, ``/v1/models``, ``/metrics``,
``/tokenize`` and ``/detokenize`` (vLLM's shapes), and ``/openapi.json``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jpaged.serve.openai import protocol as P
from jpaged.serve.openai.errors import APIError, error_response
from jpaged.serve.openai.state import ServerState


def _state(request: Request) -> ServerState:
    return request.app.state.jpaged


async def health(request: Request):
    st = _state(request)
    if getattr(st.llm, "recovering", False):
        return error_response(503, "engine is recovering from a failed step",
                              headers={"Retry-After": "1"})
    if not st.llm.is_running:
        return error_response(503, f"engine is not running: {st.llm.errored!r}")
    if st.draining:
        return error_response(503, "server is shutting down", headers={"Retry-After": "5"})
    return Response(status_code=200)


async def openapi(request: Request):
    import jpaged
    from jpaged.serve.openai.openapi import build_openapi

    st = _state(request)
    if st.openapi is None:  # built once: it only depends on the configuration
        st.openapi = build_openapi("jpaged", jpaged.__version__, st.auth is not None)
    return JSONResponse(st.openapi)


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
    req = await st.read(request, P.TokenizeRequest)
    st.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    if req.messages is not None:
        st.check_length(sum(len(m.content) if isinstance(m.content, str) else 0
                            for m in req.messages), "messages")
        text = await st.in_pool(st.render_chat, req.messages, req.add_generation_prompt)
        ids = await st.in_pool(st.tokenize, text, False)
    else:
        st.check_length(len(req.prompt))
        ids = await st.in_pool(st.tokenize, req.prompt, req.add_special_tokens)
    return JSONResponse(P.TokenizeResponse(count=len(ids), max_model_len=st.max_model_len,
                                           tokens=ids).model_dump())


async def detokenize(request: Request):
    st = _state(request)
    req = await st.read(request, P.DetokenizeRequest)
    st.check_model(req.model)
    ids = st.check_ids(req.tokens, "tokens") if req.tokens else []
    text = await st.in_pool(st.tokenizer.decode, ids)
    return JSONResponse(P.DetokenizeResponse(prompt=text).model_dump())

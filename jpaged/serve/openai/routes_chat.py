"""``POST /v1/chat/completions``: messages rendered through the chat template,
``n`` samples, as one JSON response or as Server-Sent Events (a first chunk
with the assistant role per choice, then content deltas)."""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import Response

from jpaged.serve.openai import protocol as P
from jpaged.serve.openai.encode import chat_logprobs_json, encode, prompt_logprobs_json
from jpaged.serve.openai.errors import APIError
from jpaged.serve.openai.routes_completions import check_prompt_work, stream_opts
from jpaged.serve.openai.state import ServerState
from jpaged.serve.openai.streams import (Generation, SSEResponse, collect_final,
                                         guarded_stream, sse)


async def chat_completions(request: Request):
    st: ServerState = request.app.state.jpaged
    req = await st.read(request, P.ChatCompletionRequest)
    model = st.check_model(req.model)
    include_usage, _ = stream_opts(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(400, "prompt_logprobs is not available with stream=true",
                       "prompt_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    st.check_fanout(1, req.n, max_tokens or 1, logprobs)
    st.check_length(sum(_content_chars(m.content) for m in req.messages), "messages")
    text = await st.in_pool(st.render_chat, req.messages, req.add_generation_prompt,
                            req.continue_final_message)
    ids = await st.in_pool(st.tokenize, text, False)
    if max_tokens is None and len(ids) >= st.max_model_len:
        raise APIError(400, f"prompt has {len(ids)} tokens, no room under "
                       f"max_model_len={st.max_model_len}", "messages")
    st.check_fanout(1, req.n, max_tokens, logprobs, [len(ids)])
    check_prompt_work(st, [len(ids)], 1, req.prompt_logprobs)
    params = P.make_sampling_params(req, st.vocab_size, max_tokens, logprobs,
                                    st.cfg.default_deadline_ms, req.prompt_logprobs)
    gen = Generation(st, request, f"chatcmpl-{uuid.uuid4().hex}", [ids], params, req.priority,
                     "delta" if req.stream else "final_only")
    await gen.submit_or_raise()
    if req.stream:
        return SSEResponse(
            guarded_stream(gen, _chat_chunks(gen, model, include_usage, logprobs)), gen.close,
            st.cfg.send_timeout)
    finals = await collect_final(request, gen)
    if finals is None:
        return Response(status_code=499)  # the client left

    def build() -> bytes:  # on a worker thread: logprobs can make this big
        out = finals[0]
        choices = [P.ChatChoice(
            index=o.index, message=P.ChatResponseMessage(content=o.text),
            finish_reason=o.finish_reason, stop_reason=o.stop_reason) for o in out.outputs]
        lps = [chat_logprobs_json(st, o.token_ids, o.logprobs, logprobs)
               if logprobs is not None else None for o in out.outputs]
        n_out = sum(len(o.token_ids) for o in out.outputs)
        usage = P.UsageInfo(prompt_tokens=len(ids), completion_tokens=n_out,
                            total_tokens=len(ids) + n_out)
        text = encode(P.ChatCompletionResponse(
            id=gen.base_id, model=model, choices=choices, usage=usage), lps)
        if req.prompt_logprobs is not None:  # vLLM's field, beside the choices
            text = text.replace('"prompt_logprobs":null',
                                '"prompt_logprobs":' + prompt_logprobs_json(out.prompt_logprobs),
                                1)
        return text.encode()

    return Response(await st.build(build), media_type="application/json")


def _content_chars(content) -> int:
    if isinstance(content, list):
        return sum(len(p.get("text") or "") if isinstance(p.get("text"), str) else 0
                   for p in content)
    return len(content or "")


async def _chat_chunks(gen: Generation, model: str, include_usage: bool, logprobs):
    st = gen.state
    prompt_tokens = len(gen.prompts[0])
    for k in range(P.choices_per_prompt(gen.params)):
        yield sse(P.ChatCompletionChunk(id=gen.base_id, model=model, choices=[
            P.ChatChunkChoice(index=k, delta=P.DeltaMessage(role="assistant",
                                                            content=""))]))
    async for _, out in gen.outputs():
        choices, lps = [], []
        for o in out.outputs:
            gen.completion_tokens += len(o.token_ids)
            if o.finish_reason is not None:
                gen.finish_reasons.append(o.finish_reason)
            if not o.text and not o.token_ids and o.finish_reason is None:
                continue
            choices.append(P.ChatChunkChoice(
                index=o.index, delta=P.DeltaMessage(content=o.text),
                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
            lps.append(chat_logprobs_json(st, o.token_ids, o.logprobs, logprobs)
                       if logprobs is not None else None)
        if choices:
            yield sse(encode(P.ChatCompletionChunk(id=gen.base_id, model=model,
                                                   choices=choices), lps))
    if include_usage:
        yield sse(P.ChatCompletionChunk(id=gen.base_id, model=model, choices=[],
                                         usage=gen.usage(prompt_tokens)))

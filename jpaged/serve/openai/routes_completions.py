"""``POST /v1/completions``: one or more prompts (text or token ids), ``n``
samples each, as one JSON response or as Server-Sent Events.

Choice ``i * n + k`` is sample ``k`` of prompt ``i``, as OpenAI numbers them.
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import Response

from jpaged.serve.openai import protocol as P
from jpaged.serve.openai.encode import completion_logprobs_json, encode
from jpaged.serve.openai.errors import APIError
from jpaged.serve.openai.state import ServerState
from jpaged.serve.openai.streams import (Generation, SSEResponse, collect_final,
                                         guarded_stream, sse)

def stream_opts(req) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats); a 400 if given without streaming."""
    so = req.stream_options
    if so is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    return bool(so and so.include_usage), bool(so and so.continuous_usage_stats)


async def completions(request: Request):
    st: ServerState = request.app.state.jpaged
    req = await st.read(request, P.CompletionRequest)
    model = st.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported", "best_of")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (no prompt logprobs)", "echo")
    include_usage, _ = stream_opts(req)
    raw = req.prompt
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise APIError(400, "prompt is empty", "prompt")
    st.check_fanout(len(raw), req.n, req.max_tokens, req.logprobs)
    prompts, texts = [], []
    for p in raw:
        if isinstance(p, str):
            st.check_length(len(p))
            prompts.append(await st.in_pool(st.tokenize, p, True))
            texts.append(p)
        else:
            prompts.append(st.check_ids(list(p)))
            texts.append(None)
    params = P.make_sampling_params(req, st.vocab_size, req.max_tokens, req.logprobs,
                                    st.cfg.default_deadline_ms)
    gen = Generation(st, request, f"cmpl-{uuid.uuid4().hex}", prompts, params, req.priority,
                     "delta" if req.stream else "final_only")
    await gen.submit_or_raise()
    if req.echo:
        for i, t in enumerate(texts):
            if t is None:
                texts[i] = await st.in_pool(st.tokenizer.decode, prompts[i])
    n = P.choices_per_prompt(params)
    if req.stream:
        chunks = _completion_chunks(gen, model, texts if req.echo else None, include_usage,
                                    req.logprobs)
        return SSEResponse(guarded_stream(gen, chunks), gen.close, st.cfg.send_timeout)
    finals = await collect_final(request, gen)
    if finals is None:
        return Response(status_code=499)  # the client left

    def build() -> bytes:  # on a worker thread: logprobs can make this big
        choices, lps, usage = [], [], P.UsageInfo()
        for i, out in enumerate(finals):
            usage.prompt_tokens += len(prompts[i])
            for o in out.outputs:
                usage.completion_tokens += len(o.token_ids)
                prefix = texts[i] if req.echo else ""
                choices.append(P.CompletionChoice(
                    index=i * n + o.index, text=prefix + o.text,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason))
                lps.append(completion_logprobs_json(st, o.token_ids, o.logprobs, 0)
                           if req.logprobs is not None else None)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return encode(P.CompletionResponse(id=gen.base_id, model=model, choices=choices,
                                           usage=usage), lps).encode()

    return Response(await st.build(build), media_type="application/json")


async def _completion_chunks(gen: Generation, model: str, echo_texts, include_usage: bool,
                             logprobs):
    st, n = gen.state, P.choices_per_prompt(gen.params)
    offsets: dict[int, int] = {}
    prompt_tokens = sum(map(len, gen.prompts))
    async for i, out in gen.outputs():
        choices, lps = [], []
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
                stop_reason=o.stop_reason))
            lps.append(completion_logprobs_json(st, o.token_ids, o.logprobs, off)
                       if logprobs is not None else None)
        if choices:
            yield sse(encode(P.CompletionResponse(id=gen.base_id, model=model,
                                                  choices=choices), lps))
    if include_usage:
        yield sse(P.CompletionResponse(id=gen.base_id, model=model, choices=[],
                                        usage=gen.usage(prompt_tokens)))

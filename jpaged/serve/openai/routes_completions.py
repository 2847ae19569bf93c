"""``POST /v1/completions``: one or more prompts (text or token ids), ``n``
samples each, as one JSON response or as Server-Sent Events.

Choice ``i * n + k`` is sample ``k`` of prompt ``i``, as OpenAI numbers them.
``echo`` with ``logprobs`` scores the prompt too (prompt logprobs, computed
on the device): the logprobs object covers the prompt tokens, the first with
None, then the generated ones; ``max_tokens=0`` with ``echo`` returns the
prompt alone (the engine samples one token, which is dropped), which is how
evaluation harnesses score text. vLLM's extra ``prompt_logprobs`` field
returns the same figures as each choice's ``prompt_logprobs``.
"""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import Response

from jpaged.serve.openai import protocol as P
from jpaged.serve.openai.encode import (completion_logprobs_json, echo_chars, encode,
                                        prompt_logprobs_json)
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


def check_prompt_work(st: ServerState, prompt_lens, copies: int, k: int | None) -> None:
    """Prompt logprobs build a response entry per prompt token (times ``copies``
    choices that repeat it): a 400 past max_request_work, as for generated ones."""
    if k is None:
        return
    work = sum(prompt_lens) * copies * (k + 2)
    if work > st.cfg.max_request_work:
        raise APIError(400, f"prompt tokens x copies x (prompt logprobs + 2) = {work} is over "
                       f"max_request_work={st.cfg.max_request_work}; lower the logprobs or "
                       "send less text", "prompt_logprobs")


async def completions(request: Request):
    st: ServerState = request.app.state.jpaged
    req = await st.read(request, P.CompletionRequest)
    model = st.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported", "best_of")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens=0 needs echo=true (the prompt is all it returns)",
                       "max_tokens")
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(400, "prompt_logprobs is not available with stream=true; use echo "
                       "with logprobs", "prompt_logprobs")
    echo_lps = bool(req.echo) and req.logprobs is not None
    plp_k = max(req.logprobs if echo_lps else -1,
                req.prompt_logprobs if req.prompt_logprobs is not None else -1)
    max_tokens = 1 if req.max_tokens == 0 else req.max_tokens  # 0: the token is dropped
    drop = req.max_tokens == 0
    include_usage, _ = stream_opts(req)
    raw = req.prompt
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise APIError(400, "prompt is empty", "prompt")
    st.check_fanout(len(raw), req.n, max_tokens, req.logprobs)
    prompts, texts = [], []
    for p in raw:
        if isinstance(p, str):
            st.check_length(len(p))
            prompts.append(await st.in_pool(st.tokenize, p, True))
            texts.append(p)
        else:
            prompts.append(st.check_ids(list(p)))
            texts.append(None)
    check_prompt_work(st, map(len, prompts), req.n if echo_lps else 1,
                      plp_k if plp_k >= 0 else None)
    params = P.make_sampling_params(req, st.vocab_size, max_tokens, req.logprobs,
                                    st.cfg.default_deadline_ms, plp_k if plp_k >= 0 else None)
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
                                    req.logprobs, drop)
        return SSEResponse(guarded_stream(gen, chunks), gen.close, st.cfg.send_timeout)
    finals = await collect_final(request, gen)
    if finals is None:
        return Response(status_code=499)  # the client left

    def build() -> bytes:  # on a worker thread: logprobs can make this big
        choices, lps, plps, usage = [], [], [], P.UsageInfo()
        for i, out in enumerate(finals):
            usage.prompt_tokens += len(prompts[i])
            plp = prompt_logprobs_json(out.prompt_logprobs) \
                if req.prompt_logprobs is not None else None
            for o in out.outputs:
                ids, text, lp = ([], "", []) if drop else (o.token_ids, o.text, o.logprobs)
                usage.completion_tokens += len(ids)
                prefix = texts[i] if req.echo else ""
                choices.append(P.CompletionChoice(
                    index=i * n + o.index, text=prefix + text,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason))
                echo = (prompts[i], out.prompt_logprobs) if echo_lps else None
                lps.append(completion_logprobs_json(st, ids, lp, len(prefix), echo)
                           if req.logprobs is not None else None)
                plps.append(plp)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return encode(P.CompletionResponse(id=gen.base_id, model=model, choices=choices,
                                           usage=usage), lps, plps).encode()

    return Response(await st.build(build), media_type="application/json")


async def _completion_chunks(gen: Generation, model: str, echo_texts, include_usage: bool,
                             logprobs, drop: bool):
    st, n = gen.state, P.choices_per_prompt(gen.params)
    offsets: dict[int, int] = {}
    prompt_tokens = sum(map(len, gen.prompts))
    plps: dict[int, list] = {}  # prompt -> its prompt logprobs (in its first delta only)
    shift: dict[int, int] = {}  # choice -> echo's token-string chars minus its text
    async for i, out in gen.outputs():
        choices, lps = [], []
        if out.prompt_logprobs is not None:
            plps[i] = out.prompt_logprobs
        for o in out.outputs:
            idx = i * n + o.index
            ids, text, lp = ([], "", []) if drop else (o.token_ids, o.text, o.logprobs)
            echo = None
            if echo_texts is not None and idx not in offsets:
                text = echo_texts[i] + text
                if gen.params.prompt_logprobs is not None and logprobs is not None:
                    echo = (gen.prompts[i], plps.get(i))
                    # Offsets run over token strings (see completion_logprobs_json).
                    shift[idx] = echo_chars(st, *echo) - len(echo_texts[i])
            off = offsets.get(idx, 0) + shift.get(idx, 0)
            offsets[idx] = offsets.get(idx, 0) + len(text)
            gen.completion_tokens += len(ids)
            if o.finish_reason is not None:
                gen.finish_reasons.append(o.finish_reason)
            if not text and not ids and o.finish_reason is None:
                continue
            choices.append(P.CompletionChoice(
                index=idx, text=text, finish_reason=o.finish_reason,
                stop_reason=o.stop_reason))
            lps.append(completion_logprobs_json(st, ids, lp, off, echo)
                       if logprobs is not None else None)
        if choices:
            yield sse(encode(P.CompletionResponse(id=gen.base_id, model=model,
                                                  choices=choices), lps))
    if include_usage:
        yield sse(P.CompletionResponse(id=gen.base_id, model=model, choices=[],
                                        usage=gen.usage(prompt_tokens)))

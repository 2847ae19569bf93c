"""Logprobs and responses encoded as JSON in small pieces.

A response with thousands of logprobs entries built as pydantic objects and
encoded by one ``model_dump_json`` call holds the GIL through that call and
leaves hundreds of thousands of objects for the garbage collector, whose
full passes hold it too: either stalls the event loop for a large fraction
of a second, even from a worker thread. Here each token's entry is encoded
on its own from short-lived dicts (no object outlives its token), and the
pieces are spliced into the encoded envelope, so the GIL changes hands
between pieces and ``/health`` and the streams keep moving.

Splicing is safe because the markers (``"logprobs":null``, ``"choices":[]``)
cannot occur inside an encoded string, where every quote is escaped.
"""

from __future__ import annotations

import json
import math


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None  # as pydantic encodes inf and nan


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def completion_logprobs_json(st, token_ids, logprobs, offset: int, prompt=None) -> str:
    """``/v1/completions`` logprobs: parallel lists, offsets from ``offset``.
    ``prompt`` (echo): ``(prompt ids, RequestOutput.prompt_logprobs)`` put
    before the generated tokens, with None for the first token; then offsets
    run from 0 over the token strings, prompt and generated alike, as vLLM's
    do (a prompt's token strings need not spell its text: "<s>")."""
    tokens, lps, tops, offsets = [], [], [], []

    def add(tid, entry, off):
        lp = entry.get(tid) if entry is not None else None
        tok = st.token_str(tid, lp)
        tokens.append(_dumps(tok))
        lps.append(_dumps(_num(lp.logprob) if lp else None))
        tops.append("null" if entry is None else
                    _dumps({st.token_str(t, v): _num(v.logprob) for t, v in entry.items()}))
        offsets.append(str(off))
        return off + len(tok)

    if prompt is not None:
        ids, plps = prompt
        offset = 0
        for j, tid in enumerate(ids):
            offset = add(tid, plps[j] if plps else None, offset)
    for tid, entry in zip(token_ids, logprobs or []):
        offset = add(tid, entry, offset)
    return (f'{{"tokens":[{",".join(tokens)}],"token_logprobs":[{",".join(lps)}],'
            f'"top_logprobs":[{",".join(tops)}],"text_offset":[{",".join(offsets)}]}}')


def echo_chars(st, prompt_ids, prompt_logprobs) -> int:
    """Characters of the prompt's token strings (where echo's offsets end)."""
    return sum(len(st.token_str(t, (prompt_logprobs[j] or {}).get(t) if prompt_logprobs
                                else None)) for j, t in enumerate(prompt_ids))


def prompt_logprobs_json(prompt_logprobs) -> str:
    """vLLM's ``prompt_logprobs`` field: per prompt token None (the first) or
    ``{token id: {"logprob", "rank", "decoded_token"}}``."""
    items = ["null" if e is None else _dumps({
        str(t): {"logprob": _num(v.logprob), "rank": v.rank, "decoded_token": v.decoded_token}
        for t, v in e.items()}) for e in prompt_logprobs]
    return "[" + ",".join(items) + "]"


def chat_logprobs_json(st, token_ids, logprobs, top_n: int) -> str:
    """``/v1/chat/completions`` logprobs: per token, itself and its ``top_n``."""
    content = []
    for tid, entry in zip(token_ids, logprobs or []):
        lp = entry.get(tid)
        tok = st.token_str(tid, lp)
        ranked = sorted((v.rank, t, v) for t, v in entry.items()
                        if v.rank is not None and 1 <= v.rank <= top_n)
        top = [{"token": (s := st.token_str(t, v)), "logprob": _num(v.logprob),
                "bytes": list(s.encode())} for _, t, v in ranked]
        content.append(_dumps({"token": tok, "logprob": _num(lp.logprob) if lp else 0.0,
                               "bytes": list(tok.encode()), "top_logprobs": top}))
    return '{"content":[' + ",".join(content) + "]}"


def encode(response, logprobs_json: list[str | None] | None = None,
           prompt_json: list[str | None] | None = None) -> str:
    """``response`` (a pydantic response or chunk whose choices have
    ``logprobs=None``) encoded, with choice ``i``'s logprobs taken from
    ``logprobs_json[i]`` and its ``prompt_logprobs`` from ``prompt_json[i]``
    where those are not None."""
    if not any(x is not None for x in (logprobs_json or []) + (prompt_json or [])):
        return response.model_dump_json()
    pieces = []
    for i, choice in enumerate(response.choices):
        text = choice.model_dump_json()
        lp = logprobs_json[i] if logprobs_json else None
        if lp is not None:
            text = text.replace('"logprobs":null', '"logprobs":' + lp, 1)
        plp = prompt_json[i] if prompt_json else None
        if plp is not None:
            text = text.replace('"prompt_logprobs":null', '"prompt_logprobs":' + plp, 1)
        pieces.append(text)
    envelope = response.model_copy(update={"choices": []}).model_dump_json()
    return envelope.replace('"choices":[]', '"choices":[' + ",".join(pieces) + "]", 1)

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


def completion_logprobs_json(st, token_ids, logprobs, offset: int) -> str:
    """``/v1/completions`` logprobs: parallel lists, offsets from ``offset``."""
    tokens, lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, logprobs or []):
        lp = entry.get(tid)
        tok = st.token_str(tid, lp)
        tokens.append(_dumps(tok))
        lps.append(_dumps(_num(lp.logprob) if lp else None))
        tops.append(_dumps({st.token_str(t, v): _num(v.logprob) for t, v in entry.items()}))
        offsets.append(str(offset))
        offset += len(tok)
    return (f'{{"tokens":[{",".join(tokens)}],"token_logprobs":[{",".join(lps)}],'
            f'"top_logprobs":[{",".join(tops)}],"text_offset":[{",".join(offsets)}]}}')


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


def encode(response, logprobs_json: list[str | None] | None = None) -> str:
    """``response`` (a pydantic response or chunk whose choices have
    ``logprobs=None``) encoded, with choice ``i``'s logprobs taken from
    ``logprobs_json[i]`` where that is not None."""
    if not logprobs_json or all(lp is None for lp in logprobs_json):
        return response.model_dump_json()
    pieces = []
    for choice, lp in zip(response.choices, logprobs_json):
        text = choice.model_dump_json()
        if lp is not None:
            text = text.replace('"logprobs":null', '"logprobs":' + lp, 1)
        pieces.append(text)
    envelope = response.model_copy(update={"choices": []}).model_dump_json()
    return envelope.replace('"choices":[]', '"choices":[' + ",".join(pieces) + "]", 1)

"""OpenAI-shaped request and response bodies (pydantic), plus vLLM's extras,
and the reading of a request body into them and into `SamplingParams`.

Requests are validated in strict mode (no string-to-number coercion, no
NaN or infinity); every validation failure becomes a 400 at the edge
(`read_model`). Unknown fields are kept in ``model_extra`` so the server can
log and ignore them. Integers that reach device arrays are bounded to int32
here, because `SamplingParams` only checks their lower bounds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jpaged.sampling_params import SamplingParams
from jpaged.serve.logsafe import get_logger
from jpaged.serve.openai.errors import APIError, param_of

logger = get_logger(__name__)

INT32_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1

Int32 = Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
ShortStr = Annotated[str, Field(max_length=4096)]
StopStr = Annotated[str, Field(max_length=1024)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(_Request):
    """Sampling fields shared by completions and chat (OpenAI's and vLLM's)."""

    model: ShortStr | None = None
    n: Int32 = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int32 | None = None
    min_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    stop: StopStr | Annotated[list[StopStr], Field(max_length=64)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=1024)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: Int32 = 0
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: ShortStr | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=64)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(max_length=128)] | None = None
    bad_words: Annotated[list[ShortStr], Field(max_length=16)] | None = None
    # Service levels (jpaged): ms from arrival to finish, and to the first token.
    deadline_ms: Annotated[float, Field(gt=0, le=1e9)] | None = None
    ttft_slo_ms: Annotated[float, Field(gt=0, le=1e9)] | None = None
    # vLLM's extra field: the prompt's logprobs, returned as `prompt_logprobs`.
    prompt_logprobs: Int32 | None = None
    # Beam search (vLLM's extra body fields): ``n`` is the beam width and
    # every beam comes back as a choice, best first.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Int32 | None = 16
    echo: bool | None = False
    logprobs: Int32 | None = None
    suffix: str | None = None
    best_of: Int32 | None = None


class ChatMessage(_Request):
    role: ShortStr
    content: str | list[dict[str, Any]] | None = None
    name: ShortStr | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = False
    top_logprobs: Int32 | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TokenizeRequest(_Request):
    model: ShortStr | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: ShortStr | None = None
    tokens: list[TokenId]


# ------------------------------------------------------------- responses
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list | None = None  # filled by encode()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: list | None = None  # spliced in as JSON by the route


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jpaged"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# --------------------------------------------------------------- reading
async def read_model(request, cls, max_bytes: int, timeout: float | None = None):
    """The body of ``request`` validated as ``cls``: a 413 over ``max_bytes``,
    a 408 if it takes longer than ``timeout`` seconds to arrive."""
    cl = request.headers.get("content-length")
    if cl is not None and (not cl.isdigit() or int(cl) > max_bytes):
        raise APIError(413, f"request body is over {max_bytes} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(413, f"request body is over {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"request body did not arrive within {timeout:g}s") from None
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


def make_sampling_params(req, vocab_size: int, max_tokens, logprobs,
                         default_deadline_ms: float | None = None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
    """`SamplingParams` from a completion or chat request; a 400 naming a bad field."""
    if req.use_beam_search:
        return _beam_params(req, max_tokens, logprobs, default_deadline_ms)
    top_k = req.top_k if req.top_k is not None else 0
    if top_k >= vocab_size:
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
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens, logit_bias=req.logit_bias or None,
            allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words,
            deadline_ms=req.deadline_ms if req.deadline_ms is not None else default_deadline_ms,
            ttft_slo_ms=req.ttft_slo_ms)
    except ValueError as e:
        raise APIError(400, str(e), param_of(str(e))) from None


def _beam_params(req, max_tokens, logprobs, default_deadline_ms) -> SamplingParams:
    """A beam search of width ``n``; streaming is refused (a beam search has
    no partial output: intermediate beams are not prefixes of the final ones)."""
    if req.stream:
        raise APIError(400, "use_beam_search does not support stream=true", "stream")
    try:
        return SamplingParams(
            num_beams=req.n, num_return_sequences=req.n,
            temperature=0.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else
            req.repetition_penalty,
            length_penalty=req.length_penalty, early_stopping=req.early_stopping,
            max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
            stop=req.stop, stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, logit_bias=req.logit_bias or None,
            allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words,
            deadline_ms=req.deadline_ms if req.deadline_ms is not None else default_deadline_ms,
            ttft_slo_ms=req.ttft_slo_ms)
    except ValueError as e:
        raise APIError(400, str(e), param_of(str(e))) from None


def choices_per_prompt(params: SamplingParams) -> int:
    """How many choices each prompt has: ``n`` samples, or the beams returned."""
    return params.num_return_sequences if params.num_beams > 1 else params.n

"""Prompts of encoder-decoder models (BART, mBART): what the encoder reads,
what the decoder starts from, and the one engine sequence that holds both.

A string or token ids go to the encoder; the decoder starts from
``decoder_start_token_id`` and, when a target language or forced BOS is set,
that token (mBART-50's language code: placed in the decoder prompt, as
transformers' ``forced_bos_token_id`` forces it as the first generated
token). A dict sets more: ``{"encoder_prompt": ..., "decoder_prompt": ...}``
(each a string, token ids, or a ``{"prompt"/"prompt_token_ids": ...}``
dict, as vLLM's explicit encoder-decoder prompt), or ``prompt`` /
``prompt_token_ids`` with ``src_lang`` (the tokenizer's source language
code), ``tgt_lang`` (the target's) or ``forced_bos_token_id``.

The engine sequence is the encoder ids, padded with the pad id up to a
whole number of KV blocks (so the decoder's blocks start on a block
boundary), then the decoder ids; `jpaged.models.bart` reads it that way.
"""

from __future__ import annotations

from dataclasses import dataclass

_KEYS = {"prompt", "prompt_token_ids", "encoder_prompt", "decoder_prompt", "src_lang",
         "tgt_lang", "forced_bos_token_id"}


@dataclass
class EncDecPrompt:
    text: str | None  # the encoder's text, if given as text
    encoder_ids: list[int]
    decoder_ids: list[int]  # the user-visible prompt of the outputs
    engine_ids: list[int]  # encoder ids, padding to a block boundary, decoder ids

    @property
    def encoder_len(self) -> int:
        return len(self.encoder_ids)


def _lang_id(tokenizer, code, name: str) -> int:
    if not isinstance(code, str) or not code:
        raise ValueError(f"{name}={code!r} must be a language code string")
    table = getattr(tokenizer, "lang_code_to_id", None)
    tid = table.get(code) if table else None
    if tid is None:
        tid = tokenizer.convert_tokens_to_ids(code)
        if tid is None or tid == tokenizer.unk_token_id or code not in tokenizer.get_vocab():
            raise ValueError(f"{name}={code!r} is not a language code of this tokenizer")
    return int(tid)


def unwrap_prompt_dict(part, name: str):
    """``{"prompt_token_ids": ...}`` or ``{"prompt": ...}`` -> its value (ids
    win); anything else unchanged. ``name`` names the part in the error."""
    if not isinstance(part, dict):
        return part
    if "prompt_token_ids" in part:
        return part["prompt_token_ids"]
    if "prompt" in part:
        return part["prompt"]
    raise ValueError(f"{name} needs 'prompt' or 'prompt_token_ids'")


def _ids(part, tokenizer, check, name: str, special: bool, src_lang=None):
    """Token ids of one prompt part (string, ids, or a prompt dict)."""
    part = unwrap_prompt_dict(part, name)
    if isinstance(part, str):
        if not part:
            raise ValueError(f"{name} is empty")
        if src_lang is not None:
            return part, _with_src_lang(tokenizer, part, src_lang, special)
        return part, list(tokenizer(part, add_special_tokens=special).input_ids)
    if isinstance(part, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                               for i in part):
        ids = [int(i) for i in part]
        if not ids:
            raise ValueError(f"{name} is empty")
        check(ids)
        return None, ids
    raise ValueError(f"{name} must be a string or a list of token ids, got "
                     f"{type(part).__name__}")


def _with_src_lang(tokenizer, text: str, src_lang: str, special: bool) -> list[int]:
    """mBART-50: the source language code leads the encoder ids."""
    _lang_id(tokenizer, src_lang, "src_lang")
    if not hasattr(tokenizer, "src_lang"):
        raise ValueError("src_lang needs a tokenizer with language codes (mBART-50)")
    before = tokenizer.src_lang
    tokenizer.src_lang = src_lang
    try:
        return list(tokenizer(text, add_special_tokens=special).input_ids)
    finally:
        tokenizer.src_lang = before


def encdec_prompt(prompt, tokenizer, encdec, block_size: int, check_ids) -> EncDecPrompt:
    """Parse ``prompt`` for an encoder-decoder model (`EncDecConfig` ``encdec``);
    ``check_ids(ids)`` raises ValueError for ids outside the vocabulary."""
    opts = {}
    if isinstance(prompt, dict):
        unknown = set(prompt) - _KEYS
        if unknown:
            raise ValueError(f"prompt key {sorted(unknown)[0]!r} is not supported for an "
                             f"encoder-decoder model; use {', '.join(sorted(_KEYS))}")
        opts = prompt
        if "encoder_prompt" in prompt:
            enc_part = prompt["encoder_prompt"]
        elif "prompt_token_ids" in prompt or "prompt" in prompt:
            enc_part = prompt.get("prompt_token_ids", prompt.get("prompt"))
        else:
            raise ValueError("a prompt dict needs 'prompt', 'prompt_token_ids' or "
                             "'encoder_prompt'")
    else:
        enc_part = prompt
    src = opts.get("src_lang")
    if src is not None and not isinstance(enc_part, str):
        raise ValueError("src_lang applies to a text encoder prompt, not token ids")
    text, enc = _ids(enc_part, tokenizer, check_ids, "encoder_prompt", True,
                     src_lang=src)
    if len(enc) > encdec.max_positions:
        raise ValueError(f"encoder prompt has {len(enc)} tokens, over the model's "
                         f"max_position_embeddings={encdec.max_positions}")
    if opts.get("decoder_prompt") is not None:
        _, dec = _ids(opts["decoder_prompt"], tokenizer, check_ids, "decoder_prompt", False)
    else:
        dec = [encdec.decoder_start_token_id]
        forced = encdec.forced_bos_token_id
        if opts.get("tgt_lang") is not None:
            forced = _lang_id(tokenizer, opts["tgt_lang"], "tgt_lang")
        if opts.get("forced_bos_token_id") is not None:
            forced = opts["forced_bos_token_id"]
            if isinstance(forced, bool) or not isinstance(forced, int):
                raise ValueError(f"forced_bos_token_id={forced!r} must be a token id")
            check_ids([forced])
        if forced is not None:
            dec.append(int(forced))
    pad = -len(enc) % block_size
    return EncDecPrompt(text, enc, dec, enc + [encdec.pad_token_id] * pad + dec)

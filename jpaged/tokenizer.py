"""Tokenizer layer: loading, chat prompts and incremental detokenization.

* `load_tokenizer` loads the checkpoint's tokenizer with transformers, from
  a model directory or from a GGUF file's metadata (vocabulary, merges,
  special tokens and chat template).
* `apply_chat_template` renders messages with transformers'
  ``apply_chat_template``, whose Jinja runs in a sandboxed environment; a
  template given by the user is rendered the same way (never by a plain
  ``jinja2.Environment``).
* `IncrementalDetokenizer` turns a growing list of token ids into text
  pieces whose concatenation equals ``tokenizer.decode(ids)``, including
  multi-byte characters split over tokens (a piece is released only once its
  bytes decode cleanly). It uses tokenizers' ``DecodeStream`` when the
  tokenizer is a fast one and a prefix-offset fallback otherwise.
"""

from __future__ import annotations

import os


def _gguf_tokenizer_cache(path: str) -> str | None:
    """Where the tokenizer converted from a GGUF file is kept (keyed by the
    file's path, size and mtime), or None when caching is off
    (``JPAGED_COMPILE_CACHE=0`` turns off every jpaged cache)."""
    import hashlib

    if os.environ.get("JPAGED_COMPILE_CACHE") == "0":
        return None
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jpaged", "tokenizers", key.hexdigest()[:24])


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if path.endswith(".gguf") and os.path.isfile(path):
        # Converting the GGUF vocabulary takes seconds; a saved copy loads at once.
        cache = _gguf_tokenizer_cache(path)
        if cache is not None and os.path.isfile(os.path.join(cache, "tokenizer.json")):
            return AutoTokenizer.from_pretrained(cache)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                            gguf_file=os.path.basename(path))
        if cache is not None:
            try:
                tmp = f"{cache}.tmp{os.getpid()}"
                tok.save_pretrained(tmp)
                os.replace(tmp, cache)
            except OSError:  # a read-only home or a concurrent writer: no cache
                pass
        return tok
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer={path!r} is not a local directory or .gguf file")
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def apply_chat_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
                        chat_template: str | None = None, **kwargs) -> str:
    """Render chat messages to a prompt string with the (sandboxed) template."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if "role" not in m:
            raise ValueError(f"message {m!r} has no 'role'")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template; pass chat_template")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt,
        chat_template=chat_template, **kwargs)


class IncrementalDetokenizer:
    """Streams text for a sequence of generated token ids.

    ``step(token_id)`` returns the new text made final by that token ('' if
    it ends inside a multi-byte character); ``finish()`` releases what is
    still held back. ``text`` is everything so far.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.ids: list[int] = []
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        self._backend = backend
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._prefix_offset = 0
        self._read_offset = 0

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, int(token_id)) or ""
            except Exception:  # ids outside the tokenizer's vocabulary decode to nothing
                piece = ""
        else:
            piece = self._fallback_step()
        self.text += piece
        return piece

    def finish(self) -> str:
        """Release bytes still held back (an incomplete character at the end
        decodes to U+FFFD, as in a full decode). Returns the final piece."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        piece = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += piece
        return piece

    def _fallback_step(self) -> str:
        decode = lambda ids: self.tokenizer.decode(  # noqa: E731
            ids, skip_special_tokens=self.skip_special_tokens)
        prefix = decode(self.ids[self._prefix_offset:self._read_offset])
        full = decode(self.ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return new
        return ""

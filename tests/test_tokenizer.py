"""Tokenizer layer: incremental detokenization and chat templates."""

import numpy as np
import pytest

from jpaged.tokenizer import IncrementalDetokenizer, apply_chat_template, load_tokenizer


@pytest.fixture(scope="module")
def tok(llama_dir):
    return load_tokenizer(llama_dir)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_equals_full_decode_random_ids(tok, skip_special_tokens):
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = [int(i) for i in rng.integers(0, len(tok), rng.integers(1, 48))]
        d = IncrementalDetokenizer(tok, skip_special_tokens)
        pieces = [d.step(i) for i in ids] + [d.finish()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_stream_non_ascii_split_across_tokens(tok):
    text = "Café 你好，世界！🙂 Привет 🚀 naïve"
    ids = tok(text, add_special_tokens=False).input_ids
    byte_tokens = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert byte_tokens, "expected some tokens that are partial UTF-8 sequences"
    d = IncrementalDetokenizer(tok)
    pieces = [d.step(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.finish() == text


def test_chat_template(tok):
    prompt = apply_chat_template(tok, [{"role": "user", "content": "hi"}])
    assert prompt == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="role"):
        apply_chat_template(tok, [{"content": "hi"}])


def test_chat_template_is_sandboxed(tok):
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception, match="(?i)unsafe|security|access"):
        apply_chat_template(tok, [{"role": "user", "content": "x"}], chat_template=evil)

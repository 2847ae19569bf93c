"""The tokenizer converted from a GGUF file is saved once and reloaded from
the copy (start-up: the conversion takes seconds); the copy tokenizes, renders
the chat template and names special tokens exactly as the conversion does."""

import pytest

from jpaged.tokenizer import load_tokenizer


def test_gguf_tokenizer_is_cached_and_equal(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from jpaged.model_loader import default_model_path

    gguf = default_model_path()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("JPAGED_COMPILE_CACHE", raising=False)
    first = load_tokenizer(gguf)
    assert list((tmp_path / "jpaged" / "tokenizers").iterdir()), "nothing was cached"
    real = AutoTokenizer.from_pretrained

    def no_conversion(*args, **kwargs):
        assert "gguf_file" not in kwargs, "converted again instead of using the cache"
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_conversion)
    cached = load_tokenizer(gguf)
    msgs = [{"role": "user", "content": "What is the capital of France? Ünïcode 日本"}]
    text = first.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert cached.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    assert cached(text).input_ids == first(text).input_ids
    assert (cached.eos_token_id, cached.bos_token_id, len(cached)) == \
        (first.eos_token_id, first.bos_token_id, len(first))


def test_cache_off_converts_each_time(tmp_path, monkeypatch):
    from jpaged.model_loader import default_model_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("JPAGED_COMPILE_CACHE", "0")
    load_tokenizer(default_model_path())
    assert not (tmp_path / "jpaged").exists()


def test_not_a_tokenizer_path_names_it():
    with pytest.raises(ValueError, match="nope"):
        load_tokenizer("/nope")

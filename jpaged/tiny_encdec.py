"""Tiny offline BART and mBART-50 checkpoints (random weights) for tests and examples.

`make_tiny_encdec` writes a Hugging Face model directory with no network:
``config.json``, seeded random weights in safetensors (initialised and saved
by transformers, so it needs PyTorch, a test dependency), and a tokenizer.
BART gets a byte-level BPE trained on `jpaged.tiny`'s corpus (``<s> text
</s>``); mBART gets an mBART-50 tokenizer (transformers' ``MBart50Tokenizer``
built from a small unigram vocabulary) whose vocabulary carries the 52
mBART-50 language codes as special tokens, so ``src_lang``/``tgt_lang`` work
as with ``facebook/mbart-large-50-many-to-many-mmt``.
"""

from __future__ import annotations

import os

from jpaged.tiny import _CORPUS

ARCHS = ("bart", "mbart")


def _bart_tokenizer(vocab_size: int):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from jpaged.tiny import BOS, EOS, PAD, _train_tokenizer

    tok = _train_tokenizer(vocab_size)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, clean_up_tokenization_spaces=False)


def _mbart_tokenizer():
    from transformers import MBart50Tokenizer

    words = sorted({w.strip(".,!?:;\"'()") for w in _CORPUS.split()} - {""})
    chars = sorted(set(_CORPUS) - set(" \n"))
    pieces = [("▁" + w, -5.0 - 0.01 * i) for i, w in enumerate(words)]
    pieces += [("▁", -8.0)] + [(c, -10.0) for c in chars]
    # The tokenizer adds <s>, <pad>, </s>, <unk> first and the language codes last.
    return MBart50Tokenizer(vocab=[("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0)] + pieces,
                            src_lang="en_XX", tgt_lang="fr_XX")


def make_tiny_encdec(path: str, arch: str = "bart", *, d_model: int = 64, layers: int = 2,
                     heads: int = 4, ffn_dim: int = 128, max_position_embeddings: int = 128,
                     scale_embedding: bool = False, tie_word_embeddings: bool = True,
                     init_std: float = 0.3, seed: int = 0, forced_bos_token_id=None,
                     eos_bias: float = 0.0) -> str:
    """Write a random-weight BART (``arch="bart"``) or mBART-50 (``"mbart"``)
    checkpoint with its tokenizer to ``path``; return ``path``. ``eos_bias``
    is added to EOS's ``final_logits_bias`` (beam tests want beams that end)."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not supported; choose one of {', '.join(ARCHS)}")
    import torch
    from transformers import (BartConfig, BartForConditionalGeneration, MBartConfig,
                              MBartForConditionalGeneration)

    os.makedirs(path, exist_ok=True)
    tok = _bart_tokenizer(512) if arch == "bart" else _mbart_tokenizer()
    tok.save_pretrained(path)
    cfg_cls, model_cls = ((BartConfig, BartForConditionalGeneration) if arch == "bart" else
                          (MBartConfig, MBartForConditionalGeneration))
    cfg = cfg_cls(
        vocab_size=len(tok), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim,
        max_position_embeddings=max_position_embeddings, scale_embedding=scale_embedding,
        tie_word_embeddings=tie_word_embeddings, init_std=init_std,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
        forced_bos_token_id=forced_bos_token_id, forced_eos_token_id=None,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # a non-zero bias, so that a loader that drops it fails
        model.final_logits_bias.normal_(0.0, 0.5)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
        model.final_logits_bias[0, tok.eos_token_id] += eos_bias
    model.save_pretrained(path)
    return path

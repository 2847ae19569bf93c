"""BART and mBART (encoder-decoder) against transformers on tiny random
checkpoints: the paged forward's logits within 1e-4, greedy and 4-beam
outputs equal to ``generate`` token for token (scores within 1e-4) in batches
that mix encoder lengths, the encoder blocks shared by the beams of a group,
preemption, and every block free afterwards."""

import numpy as np
import pytest

from jpaged import LLM, SamplingParams

MAX_TOKENS = 10
# Encoder lengths 3 to 22: one, two and three blocks of 8, in one batch.
ENCODER_PROMPTS = [[5, 6, 7, 8, 9], [40], list(range(50, 70)), [300, 301, 302], [11, 12, 13]]
# EOS biases that make beams end at mixed lengths on these seeds.
CHECKPOINTS = {"bart": dict(arch="bart", eos_bias=8.0),
               "mbart": dict(arch="mbart", eos_bias=2.0),
               "bart-untied-scaled": dict(arch="bart", tie_word_embeddings=False,
                                          scale_embedding=True, eos_bias=8.0)}
_DIRS, _HF = {}, {}


def model_dir(tmp_path_factory, name):
    from jpaged.tiny_encdec import make_tiny_encdec

    if name not in _DIRS:
        _DIRS[name] = make_tiny_encdec(str(tmp_path_factory.mktemp(name)), **CHECKPOINTS[name])
    return _DIRS[name]


def hf_model(path):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    if path not in _HF:
        _HF[path] = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF[path]


def encoder_ids(path, body):
    """The tokenizer's special tokens around ``body`` (<s> ... </s>, or the
    language code ... </s> for mBART-50)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    prefix = getattr(tok, "prefix_tokens", None) or [tok.bos_token_id]
    return list(prefix) + body + [tok.eos_token_id]


def hf_generate(path, enc, width, **kw):
    import torch

    with torch.no_grad():
        r = hf_model(path).generate(
            torch.tensor([enc]), attention_mask=torch.ones(1, len(enc), dtype=torch.long),
            num_beams=width, num_return_sequences=width, do_sample=False,
            max_new_tokens=MAX_TOKENS, return_dict_in_generate=True, output_scores=True, **kw)
    if width == 1:
        seq = r.sequences[0, 1:].tolist()  # after decoder_start_token_id
        return [(seq, None)]
    lens = (r.beam_indices != -1).sum(1).tolist()
    return [(r.sequences[i, 1:1 + n].tolist(), float(r.sequences_scores[i]))
            for i, n in enumerate(lens)]


def assert_all_free(engine):
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv.num_free_blocks == engine.kv.num_blocks - 1
    assert not engine.kv.req_to_blocks


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = LLM(model_dir(tmp_path_factory, name), block_size=8, max_num_seqs=16,
                             max_num_batched_tokens=32, max_model_len=256, **kw)
        return cache[key]
    return get


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_equal_transformers(tmp_path_factory, name):
    """One paged step over two sequences (encoder lengths 7 and 3, block
    size 4, decoder prompts of 3 and 6 tokens), against the HF forward."""
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from jpaged.layers.attention import AttentionMetadata
    from jpaged.model_loader.loader import load_model

    path = model_dir(tmp_path_factory, name)
    cfg, graphdef, params = load_model(path)
    model = nnx.merge(graphdef, params)
    bs, nb, maxb = 4, 32, 12
    shape = (nb, bs, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
    encs = [[0, 5, 6, 7, 8, 9, 2], [0, 40, 2]]
    decs = [[2, 33, 44], [2, 7, 8, 9, 10, 11]]
    ids, pos, slots, ctx, qsl, tables, nxt = [], [], [], [], [0], [], 1
    for e, d in zip(encs, decs):
        seq = e + [1] * (-len(e) % bs) + d
        blocks = list(range(nxt, nxt + -(-len(seq) // bs)))
        nxt += len(blocks)
        ids += seq
        pos += range(len(seq))
        slots += [blocks[p // bs] * bs + p % bs for p in range(len(seq))]
        ctx.append(len(seq))
        qsl.append(qsl[-1] + len(seq))
        tables.append(blocks + [0] * (maxb - len(blocks)))
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    md = AttentionMetadata(slot_mapping=i32(slots), block_tables=i32(tables),
                           context_lens=i32(ctx), query_start_loc=i32(qsl))
    hidden, _ = model(i32(ids), i32(pos), caches, md, encoder_lens=i32([len(e) for e in encs]))
    logits = np.asarray(model.compute_logits(hidden))
    for i, (e, d) in enumerate(zip(encs, decs)):
        with torch.no_grad():
            ref = hf_model(path)(input_ids=torch.tensor([e]),
                                 decoder_input_ids=torch.tensor([d])).logits[0].numpy()
        start = qsl[i] + len(e) + (-len(e) % bs)
        np.testing.assert_allclose(logits[start:start + len(d)], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["bart", "mbart"])
def test_greedy_equals_generate(llms, name):
    llm = llms(name)
    path = llm.llm_engine.config.model
    encs = [encoder_ids(path, p) for p in ENCODER_PROMPTS]
    outs = llm.generate([{"prompt_token_ids": e} for e in encs],
                        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    stops = 0
    for e, out in zip(encs, outs):
        assert out.prompt_token_ids == [llm.llm_engine.model_config
                                        .encoder_decoder.decoder_start_token_id]
        assert list(out.outputs[0].token_ids) == hf_generate(path, e, 1)[0][0]
        stops += out.outputs[0].finish_reason == "stop"
    assert 0 < stops < len(encs), "greedy runs should both end on EOS and run to length"
    assert_all_free(llm.llm_engine)


@pytest.mark.parametrize("lp,es", [(1.0, False), (0.5, True), (2.0, "never")])
@pytest.mark.parametrize("name", ["bart", "mbart"])
def test_beam4_equals_generate(llms, name, lp, es):
    llm = llms(name)
    path = llm.llm_engine.config.model
    encs = [encoder_ids(path, p) for p in ENCODER_PROMPTS]
    sp = SamplingParams(num_beams=4, num_return_sequences=4, temperature=0.0,
                        max_tokens=MAX_TOKENS, length_penalty=lp, early_stopping=es)
    outs = llm.generate([{"prompt_token_ids": e} for e in encs], sp, use_tqdm=False)
    stops = 0
    for e, out in zip(encs, outs):
        want = hf_generate(path, e, 4, length_penalty=lp, early_stopping=es)
        got = [(list(c.token_ids), c.cumulative_logprob / len(c.token_ids) ** lp)
               for c in out.outputs]
        assert [t for t, _ in got] == [t for t, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-4)
        stops += sum(c.finish_reason == "stop" for c in out.outputs)
    assert stops > 0, "no beam ended on EOS"
    assert_all_free(llm.llm_engine)


def test_beams_share_encoder_blocks(llms):
    engine = llms("bart").llm_engine
    enc = encoder_ids(engine.config.model, list(range(50, 70)))  # 22 tokens: 3 blocks
    engine.add_request("enc", {"prompt_token_ids": enc},
                       SamplingParams(num_beams=4, num_return_sequences=4, temperature=0.0,
                                      max_tokens=MAX_TOKENS, ignore_eos=True))
    shared = 0
    while engine.has_unfinished_requests():
        engine.step()
        beams = [r for r in engine.scheduler.running if r.beam is not None]
        if len(beams) == 4:
            blocks = [engine.kv.req_to_blocks[b.request_id][:3] for b in beams]
            assert all(x == blocks[0] for x in blocks)  # one copy of the encoder's K/V
            shared = max(shared, min(b.ref_cnt for b in blocks[0]))
    assert shared == 4
    assert_all_free(engine)


@pytest.mark.parametrize("width,case", [
    (4, dict(num_kv_blocks=22, preemption_mode="recompute")),
    (1, dict(num_kv_blocks=7, preemption_mode="swap", swap_space=0.01))],
    ids=["beams-recompute", "greedy-swap"])
def test_parity_under_preemption(llms, width, case):
    """A cache too small for every request at once: requests are preempted
    (the encoder runs again on recompute; a swapped row's token history
    returns without its encoder tokens) and still equal transformers, with
    the repetition penalty on."""
    llm = llms("mbart", **case)
    engine = llm.llm_engine
    path = engine.config.model
    encs = [encoder_ids(path, p) for p in ENCODER_PROMPTS]
    sp = SamplingParams(num_beams=width, num_return_sequences=width, temperature=0.0,
                        max_tokens=MAX_TOKENS, repetition_penalty=1.2)
    outs = llm.generate([{"prompt_token_ids": e} for e in encs], sp, use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0
    for e, out in zip(encs, outs):
        want = hf_generate(path, e, width, repetition_penalty=1.2)
        assert [list(c.token_ids) for c in out.outputs] == [t for t, _ in want]
    assert_all_free(engine)
    assert engine.kv.num_used_host_blocks == 0


def test_mbart50_language_codes(llms):
    """src_lang leads the encoder ids, tgt_lang follows decoder_start in the
    decoder prompt (mBART-50's forced BOS); the beams equal transformers fed
    the same ids; an unknown code is a ValueError naming it."""
    from transformers import AutoTokenizer

    llm = llms("mbart")
    path = llm.llm_engine.config.model
    tok = AutoTokenizer.from_pretrained(path)
    text = "The capital of France is Paris."
    outs = llm.generate([{"prompt": text, "src_lang": "de_DE", "tgt_lang": "ro_RO"},
                         {"encoder_prompt": text, "decoder_prompt": {"prompt_token_ids": [
                             2, tok.convert_tokens_to_ids("ro_RO")]}}],
                        SamplingParams(num_beams=4, num_return_sequences=4, temperature=0.0,
                                       max_tokens=MAX_TOKENS), use_tqdm=False)
    ro = tok.convert_tokens_to_ids("ro_RO")
    assert outs[0].prompt_token_ids == [2, ro] == outs[1].prompt_token_ids
    tok.src_lang = "de_DE"
    enc = tok(text).input_ids
    assert enc[0] == tok.convert_tokens_to_ids("de_DE") and enc[-1] == tok.eos_token_id
    import torch

    def hf_beams(enc):
        with torch.no_grad():
            r = hf_model(path).generate(
                torch.tensor([enc]), decoder_input_ids=torch.tensor([[2, ro]]), num_beams=4,
                num_return_sequences=4, do_sample=False, max_new_tokens=MAX_TOKENS)
        return [[t for t in s[2:] if t != tok.pad_token_id] for s in r.tolist()]

    assert [list(c.token_ids) for c in outs[0].outputs] == hf_beams(enc)
    tok.src_lang = "en_XX"  # the default code leads the explicit encoder prompt
    assert [list(c.token_ids) for c in outs[1].outputs] == hf_beams(tok(text).input_ids)
    for bad in ({"prompt": text, "tgt_lang": "xx_YY"}, {"prompt": text, "src_lang": "qq"},
                {"prompt": [5, 6], "src_lang": "de_DE"}, {"prompt": text, "lang": "de_DE"}):
        with pytest.raises(ValueError, match="xx_YY|qq|src_lang|lang"):
            llm.llm_engine.add_request("bad", bad, SamplingParams(max_tokens=2))
    assert not llm.llm_engine.has_unfinished_requests()


def test_translate_example_runs_offline():
    """examples/translate_beam.py as written: a tiny offline mBART-50, beam search."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "translate_beam.py"),
                        "--max-tokens", "6", "--max-num-batched-tokens", "32",
                        "--tgt-lang", "de_DE", "Hello world.", "The cat sat."],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert lines[0] == "[en_XX] Hello world." and lines[2] == "[en_XX] The cat sat."
    assert lines[1].startswith("[de_DE] ") and lines[3].startswith("[de_DE] ")


def test_no_prefix_cache_across_encoder_prompts(llms):
    """Two encoder prompts that share their first block but not the rest: an
    encoder block's cross K/V depends on the whole encoder prompt, so the
    second request must not reuse the first's (prefix caching is off for
    encoder-decoder models, whatever the engine flag says)."""
    llm = llms("bart", enable_prefix_caching=True)
    path = llm.llm_engine.config.model
    head = list(range(20, 27))  # with <s>: one full block of 8
    encs = [encoder_ids(path, head + [100, 101, 102]), encoder_ids(path, head + [200, 201])]
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for e in encs:  # one after the other: the first's blocks are free (cached) then
        out = llm.generate([{"prompt_token_ids": e}], sp, use_tqdm=False)[0]
        want = hf_generate(path, e, 1, eos_token_id=0)[0][0]  # pad as EOS: never stops
        assert list(out.outputs[0].token_ids) == want
        assert out.num_cached_tokens == 0
    assert_all_free(llm.llm_engine)


def test_encoder_decoder_limits_are_value_errors(llms):
    """An encoder that cannot run in one step, or past the position table, and
    a decoder past its positions are refused at add_request, naming the limit."""
    engine = llms("bart").llm_engine
    sp = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="max_num_batched_tokens=32"):
        engine.add_request("long", list(range(3, 40)), sp)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        engine.add_request("longer", list(range(3, 140)), sp)
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        engine.add_request("decoder", [5, 6], SamplingParams(max_tokens=128))
    with pytest.raises(ValueError, match="decoder_prompt is empty"):
        engine.add_request("empty", {"prompt": "x", "decoder_prompt": []}, sp)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("name", ["bart", "mbart"])
def test_repetition_penalty_sees_decoder_tokens_only(llms, name):
    """The seed's form, SamplingParams(num_beams=4, repetition_penalty=1.2):
    as in transformers, the penalty counts the decoder's tokens (its start
    token included), not the encoder prompt's."""
    llm = llms(name)
    path = llm.llm_engine.config.model
    encs = [encoder_ids(path, p) for p in ENCODER_PROMPTS]
    for width in (1, 4):
        sp = SamplingParams(num_beams=width, num_return_sequences=width, temperature=0.0,
                            max_tokens=MAX_TOKENS, repetition_penalty=1.2)
        outs = llm.generate([{"prompt_token_ids": e} for e in encs], sp, use_tqdm=False)
        for e, out in zip(encs, outs):
            want = hf_generate(path, e, width, repetition_penalty=1.2)
            assert [list(c.token_ids) for c in out.outputs] == [t for t, _ in want]
    assert_all_free(llm.llm_engine)


def test_row_history_hides_encoder_blocks():
    """A re-joining row's token history (sent again after a swap) hides its
    encoder blocks, as each step's own history writes do."""
    from jpaged.runner.input_batch import InputBatch

    batch = InputBatch(2, 32, 4, 8, 10, vocab_size=500, encoder_decoder=True)
    batch.tokens[0, :14] = np.arange(1, 15)
    batch.encoder_len[0] = 3  # encoder blocks: positions 0..7
    hist = batch.history(0)
    assert (hist[:8] == 500).all() and hist[8:14].tolist() == list(range(9, 15))
    assert batch.tokens[0, 0] == 1  # the step's input ids keep the encoder's tokens
    batch.tokens[1, :4] = 7
    assert batch.history(1).tolist() == batch.tokens[1].tolist()  # decoder-only rows

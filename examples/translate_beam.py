"""Machine translation with beam search on mBART-50 (many-to-many).

    python examples/translate_beam.py --model /path/to/mbart-large-50-many-to-many-mmt \
        --src-lang en_XX --tgt-lang fr_XX "The weather is nice today."

Each sentence goes to the encoder with its source language code; the
decoder starts from the target language code (mBART-50's forced BOS). The
four beams of a sentence share its encoder's cross-attention K/V blocks and
their common decoder prefix in the paged KV cache. ``--model`` is a local
Hugging Face directory (download ``facebook/mbart-large-50-many-to-many-mmt``
first); without it the example builds a tiny random-weight mBART-50 with the
same tokenizer language codes (PyTorch needed to build it), so it runs
offline, translating nothing meaningful.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from jpaged import LLM, SamplingParams

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "The capital of France is Paris.",
             "Water boils at 100 degrees Celsius at sea level."]


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="mBART-50 checkpoint directory (default: a tiny "
                    "random-weight mBART-50 built offline)")
    ap.add_argument("--src-lang", default="en_XX", help="source language code")
    ap.add_argument("--tgt-lang", default="fr_XX", help="target language code")
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256,
                    help="tokens per engine step; each sentence's encoder runs in one step")
    ap.add_argument("sentences", nargs="*", help=f"text to translate (default: "
                    f"{len(SENTENCES)} example sentences)")
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        from jpaged.tiny_encdec import make_tiny_encdec

        model = make_tiny_encdec(os.path.join(tempfile.mkdtemp(), "tiny-mbart50"), "mbart",
                                 eos_bias=2.0)
    llm = LLM(model=model, max_num_seqs=16,
              max_num_batched_tokens=args.max_num_batched_tokens)
    params = SamplingParams(num_beams=args.num_beams, temperature=0.0,
                            max_tokens=args.max_tokens, repetition_penalty=1.2,
                            reuse_kv_cache=True)
    sentences = args.sentences or SENTENCES
    prompts = [{"prompt": s, "src_lang": args.src_lang, "tgt_lang": args.tgt_lang}
               for s in sentences]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    texts = []
    for s, out in zip(sentences, outputs):
        texts.append(out.outputs[0].text)
        print(f"[{args.src_lang}] {s}\n[{args.tgt_lang}] {texts[-1]}\n")
    return texts


if __name__ == "__main__":
    main()

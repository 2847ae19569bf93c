#!/usr/bin/env python3
"""KV memory saved by block sharing in beam search and parallel sampling, and
beam-search throughput against transformers, in one run.

Memory: the ShareGPT-like workload of scripts/bench_throughput.py (lognormal
prompt and output lengths, scaled by ``--length-scale``) runs as beam search
of widths 2, 4 and 6 and as parallel sampling with n = 2, 4 and 6, prefix
caching off so that forks are the only sharing. After every step the script
counts the KV blocks in use (each physical block once) against the blocks the
same sequences would hold if each stored its own copy (the sum of their block
lists); the saving is ``1 - in_use / unshared`` summed over all steps, printed
beside the PagedAttention paper's figures (37.6%-66.3% for beam search,
6.1%-30.5% for parallel sampling, on ShareGPT and Alpaca with OPT-13B).

Throughput: ``LLM.beam_search`` on ``--tp-prompts`` prompts against
transformers ``generate(num_beams=W)`` one prompt at a time, same prompts,
same ``max_tokens``; prints both request rates and their ratio.

Example: python scripts/bench_beam.py --num-prompts 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_throughput import workload  # noqa: E402

PAPER = {"beam": "37.6%-66.3%", "parallel": "6.1%-30.5%"}


def memory_saving(model, prompts, out_lens, args, make_params) -> tuple[float, int]:
    """Run the workload; returns (saving, peak blocks in use)."""
    from jpaged import LLMEngine

    engine = LLMEngine(model=model, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len, block_size=args.block_size,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=False)
    for i, (p, o) in enumerate(zip(prompts, out_lens)):
        engine.add_request(str(i), p, make_params(o))
    kv, used_sum, unshared_sum, peak = engine.kv, 0, 0, 0
    while engine.has_unfinished_requests():
        engine.step()
        used = kv.num_blocks - 1 - kv.num_free_blocks
        used_sum += used
        unshared_sum += sum(len(b) for b in kv.req_to_blocks.values())
        peak = max(peak, used)
    assert engine.get_stats().num_preemptions == 0, "raise --kv-cache-memory"
    return 1 - used_sum / max(unshared_sum, 1), peak


def bench_jpaged_beam(model, prompts, width, max_tokens, args) -> float:
    from jpaged import LLM, BeamSearchParams

    llm = LLM(model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=args.kv_cache_memory)
    llm.beam_search(prompts[:1], BeamSearchParams(beam_width=width, max_tokens=2))  # warm
    start = time.perf_counter()
    llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                    BeamSearchParams(beam_width=width, max_tokens=max_tokens))
    return time.perf_counter() - start


def bench_hf_beam(model, prompts, width, max_tokens) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():  # warm, as jpaged is
        m.generate(torch.tensor([prompts[0]]), num_beams=width, max_new_tokens=2,
                   attention_mask=torch.ones(1, len(prompts[0]), dtype=torch.long),
                   pad_token_id=0)
    start = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            m.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                       num_beams=width, num_return_sequences=width, do_sample=False,
                       max_new_tokens=max_tokens, pad_token_id=0)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir (default: build a ~4M Llama)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--length-scale", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--widths", default="2,4,6")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-memory", type=int, default=128 << 20)
    ap.add_argument("--tp-prompts", type=int, default=8)
    ap.add_argument("--tp-width", type=int, default=4)
    ap.add_argument("--tp-max-tokens", type=int, default=32)
    args = ap.parse_args()

    from jpaged import SamplingParams

    model = args.model
    if model is None:
        from jpaged.tiny import make_tiny_model

        model = os.path.join(tempfile.gettempdir(), "jpaged-bench-beam-llama")
        if not os.path.isfile(os.path.join(model, "model.safetensors")):
            make_tiny_model(model, arch="llama", vocab_size=2048, hidden_size=256,
                            intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2)
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts, out_lens = workload(args.num_prompts, args.length_scale, args.seed, vocab,
                                 args.max_model_len)
    print(f"workload: {len(prompts)} requests, mean prompt "
          f"{sum(map(len, prompts)) / len(prompts):.0f} tokens, mean output "
          f"{sum(out_lens) / len(out_lens):.0f} tokens, block size {args.block_size}")
    widths = [int(w) for w in args.widths.split(",")]
    print("| decoding | width / n | KV blocks saved by sharing | peak blocks in use | paper |")
    print("|---|---|---|---|---|")
    for w in widths:
        saving, peak = memory_saving(model, prompts, out_lens, args, lambda o, w=w: SamplingParams(
            num_beams=w, temperature=0.0, max_tokens=o, ignore_eos=True))
        print(f"| beam search | {w} | {saving:.1%} | {peak} | {PAPER['beam']} |")
    for n in widths:
        saving, peak = memory_saving(model, prompts, out_lens, args, lambda o, n=n: SamplingParams(
            n=n, temperature=1.0, max_tokens=o, ignore_eos=True, seed=0))
        print(f"| parallel sampling | {n} | {saving:.1%} | {peak} | {PAPER['parallel']} |")

    tp = prompts[:args.tp_prompts]
    t_j = bench_jpaged_beam(model, tp, args.tp_width, args.tp_max_tokens, args)
    t_h = bench_hf_beam(model, tp, args.tp_width, args.tp_max_tokens)
    print(f"beam search width {args.tp_width}, {len(tp)} prompts, max_tokens "
          f"{args.tp_max_tokens}: jpaged {t_j:.2f}s ({len(tp) / t_j:.2f} requests/s), "
          f"HF transformers generate(num_beams={args.tp_width}) one prompt at a time "
          f"{t_h:.2f}s ({len(tp) / t_h:.2f} requests/s); ratio jpaged / HF: {t_h / t_j:.2f}x")


if __name__ == "__main__":
    main()

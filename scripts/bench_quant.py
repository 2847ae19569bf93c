"""Accuracy and memory of jpaged's weight quantization modes on SmolLM2-135M-Instruct.

For each mode (the GGUF file dequantized to float32 is the baseline; bf16;
int8, int4 g128 and fp8 quantized from those float32 weights at load; the
file's own Q4_1 blocks; float32 weights with the fp8 e4m3 KV cache, scale
1.0) it prints: weight bytes on the device, KV cache bytes per token, perplexity on
a fixed English text at context lengths 512 and 2048 (non-overlapping
windows, every token after the first of a window scored), the largest logit
difference from the baseline over a fixed prompt set, and the share of greedy
tokens equal to the baseline's over 32 chat prompts x 64 tokens (position by
position, through the engine). Activations run in float32 except in the bf16
row, so the quantized rows show the weights' error alone.

Log-likelihoods come from a plain full-sequence forward of the model's layers
(dense causal attention, no KV cache), not from the engine; in the fp8 KV row
K and V pass through the cache's fp8 round trip (`jpaged.layers.kv_quant`)
before attention, as every cached token does in the engine.

    python3 scripts/bench_quant.py [--text FILE] [--modes fp32,int8,...]
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged.layers.kv_quant import dequantize, quantize
from jpaged.model_loader import default_model_path, load_model, weight_bytes
from jpaged.models.llama import apply_rope, rope_inv_freq
from jpaged.runner.model_runner import kv_bytes_per_block

# name -> (dtype, quantization, kv_cache_dtype)
MODES = {"fp32": ("float32", "none", "auto"), "bf16": ("bfloat16", "none", "auto"),
         "int8": ("float32", "int8", "auto"), "int4-g128": ("float32", "int4", "auto"),
         "fp8": ("float32", "fp8", "auto"), "gguf-q4_1": ("float32", None, "auto"),
         "fp8-kv": ("float32", "none", "fp8_e4m3")}
LOGIT_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                 "Water boils at a temperature of", "Once upon a time, in a small village,",
                 "The three primary colors are", "To make a cup of tea, first",
                 "In 1969, the first humans", "The quick brown fox"]
TOPICS = ["the moon", "bread", "rivers", "volcanoes", "chess", "bees", "the internet",
          "trains", "rain", "music", "gardens", "the ocean", "mountains", "libraries",
          "bicycles", "clocks"]
CHAT_PROMPTS = ([f"Tell me about {t}." for t in TOPICS]
                + [f"Write a short poem about {t}." for t in TOPICS])
PAD = 32  # logit prompts are padded to this many tokens


def make_forward(cfg, graphdef, kv_fp8: bool = False):
    """Logits ``[T, V]`` for one sequence ``ids [T]``: the model's own layers,
    with dense causal attention in place of the paged one (the paged reference
    gathers K/V per query token, which a 2048-token window cannot afford on a
    CPU); ``kv_fp8`` rounds K and V through the fp8 cache's format."""

    @jax.jit
    def forward(params, ids):
        model = nnx.merge(graphdef, params)
        t = ids.shape[0]
        pos = jnp.arange(t, dtype=jnp.int32)
        inv_freq = jnp.asarray(rope_inv_freq(cfg))
        causal = jnp.tril(jnp.ones((t, t), bool))
        nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = model.model.embed_tokens(ids)
        for layer in model.model.layers:
            qkv = layer.self_attn.qkv_proj(layer.input_layernorm(x))
            q = apply_rope(qkv[:, :nh * d].reshape(t, nh, d), pos, inv_freq)
            k = apply_rope(qkv[:, nh * d:(nh + nkv) * d].reshape(t, nkv, d), pos, inv_freq)
            v = qkv[:, (nh + nkv) * d:].reshape(t, nkv, d)
            if kv_fp8:
                k, v = (dequantize(quantize(a, 1.0), 1.0, a.dtype) for a in (k, v))
            q = q.reshape(t, nkv, nh // nkv, d).astype(jnp.float32)
            s = jnp.einsum("tkgd,skd->kgts", q, k.astype(jnp.float32)) * d ** -0.5
            p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
            o = jnp.einsum("kgts,skd->tkgd", p, v.astype(jnp.float32)).astype(x.dtype)
            x = x + layer.self_attn.o_proj(o.reshape(t, nh * d))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.compute_logits(model.model.norm(x))

    return forward


def perplexity(forward, params, ids: np.ndarray, ctx: int) -> float:
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, ctx):
        window = ids[start:start + ctx]
        if len(window) < 2:
            break
        logits = forward(params, jnp.asarray(window, jnp.int32))
        logp = jax.nn.log_softmax(logits[:-1], axis=-1)
        nll -= float(jnp.take_along_axis(logp, jnp.asarray(window[1:])[:, None], 1).sum())
        n += len(window) - 1
    return math.exp(nll / n)


def greedy(path, dtype, quantization, kv_dtype, tokenizer_prompts, max_tokens):
    from jpaged import LLM, SamplingParams

    llm = LLM(model=path, dtype=dtype, quantization=quantization, kv_cache_dtype=kv_dtype,
              max_num_seqs=32, max_model_len=512, compile_all_buckets=False)
    outs = llm.chat([[{"role": "user", "content": p}] for p in tokenizer_prompts],
                    SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                    use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2)")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3",
                    help="English text for perplexity (default: the GPL-3 text Debian ships)")
    ap.add_argument("--text-tokens", type=int, default=4096)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--greedy-tokens", type=int, default=64)
    args = ap.parse_args()
    path = args.model or default_model_path()
    from jpaged.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    with open(args.text) as f:
        text_ids = np.asarray(tok(f.read()).input_ids[:args.text_tokens], np.int32)
    assert len(text_ids) >= 2048, f"{args.text} has only {len(text_ids)} tokens"
    prompt_ids = [np.asarray(tok(p).input_ids, np.int32) for p in LOGIT_PROMPTS]
    print(f"device: {jax.devices()[0].device_kind}; text: {args.text}, {len(text_ids)} tokens")

    rows, base_logits, base_tokens = [], None, None
    args_line = f"modes {args.modes}"
    print(args_line)
    for mode in args.modes.split(","):
        dtype, quant, kv_dtype = MODES[mode]
        start = time.perf_counter()
        cfg, graphdef, params = load_model(path, dtype=dtype, quantization=quant)
        forward = make_forward(cfg, graphdef, kv_dtype != "auto")
        kv_token = kv_bytes_per_block(cfg, 1, "pallas", 1, kv_dtype)
        ppl = {c: perplexity(forward, params, text_ids, c) for c in (512, 2048)}
        print(f"{mode}: perplexity done in {time.perf_counter() - start:.0f}s", flush=True)
        # one padded length, one compile; causal attention leaves the real
        # positions untouched by the padding after them
        logits = [np.asarray(forward(params, jnp.asarray(np.pad(p, (0, PAD - len(p))))))[:len(p)]
                  for p in prompt_ids]
        nbytes = weight_bytes(params)
        del params
        tokens = greedy(path, dtype, quant, kv_dtype, CHAT_PROMPTS, args.greedy_tokens)
        if base_logits is None:
            base_logits, base_tokens = logits, tokens
        diff = max(float(np.abs(a - b).max()) for a, b in zip(logits, base_logits))
        same = np.mean([x == y for a, b in zip(tokens, base_tokens) for x, y in zip(a, b)])
        rows.append(f"| {mode} | {nbytes / 2**20:.1f} | {kv_token / 1024:.1f} | {ppl[512]:.3f} | "
                    f"{ppl[2048]:.3f} | {diff:.3f} | {same:.1%} |")
        print(f"{mode}: done in {time.perf_counter() - start:.0f}s {rows[-1]}", flush=True)

    print(f"\n| mode | weight MiB | KV KiB/token | ppl @512 | ppl @2048 | max logit diff | "
          f"greedy = baseline ({len(CHAT_PROMPTS)} x {args.greedy_tokens}) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Per-device parameter and KV cache bytes at tensor-parallel sizes 1, 2, 4, 8.

Loads one model with seeded random weights (``load_format="dummy"``, so any
shape runs without a checkpoint) at each TP size and measures what each
device holds: the bytes of the parameter shards and of the KV cache shards
on the busiest device. Both must fall as 1/N apart from the replicated parts
(norms; the k/v projections when there are fewer KV heads than devices).
Runs on fake CPU devices when no accelerators are there:

    python3 scripts/bench_tp.py            # markdown table on stdout
    python3 scripts/bench_tp.py --tp 1 2   # fewer sizes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jpaged import LLM  # noqa: E402
from jpaged.tiny import make_tiny_model  # noqa: E402

# A Llama-shaped model small enough for a CPU: GQA with 4 KV heads, so TP 8
# shows the copied KV heads.
SHAPE = dict(arch="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
             num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
             dtype="bfloat16")


def per_device(tree) -> int:
    """Bytes on the device holding the most of ``tree``'s shards."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for sh in leaf.addressable_shards:
            out[sh.device] = out.get(sh.device, 0) + sh.data.nbytes
    return max(out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--num-kv-blocks", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(tmp, write_weights=False, **SHAPE)
        rows = []
        for n in args.tp:
            llm = LLM(model, load_format="dummy", tensor_parallel_size=n, block_size=16,
                      num_kv_blocks=args.num_kv_blocks, max_num_seqs=4,
                      max_num_batched_tokens=16, max_model_len=256, compile_all_buckets=False)
            r = llm.llm_engine.runner
            total = sum(x.nbytes for x in jax.tree.leaves(r.params))
            rows.append((n, total, per_device(r.params), per_device(r.kv_caches)))
            del llm, r
    base_p, base_kv = rows[0][2], rows[0][3]
    print(f"{SHAPE['num_hidden_layers']} layers, hidden {SHAPE['hidden_size']}, "
          f"{SHAPE['num_attention_heads']} heads / {SHAPE['num_key_value_heads']} KV heads, "
          f"vocab {SHAPE['vocab_size']}, {SHAPE['dtype']}; {args.num_kv_blocks} KV blocks of 16; "
          f"{jax.device_count()} {jax.default_backend()} devices\n")
    print("| TP | params, all devices (MiB) | params per device (MiB) | x TP 1 | "
          "KV cache per device (MiB) | x TP 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, total, p, kv in rows:
        print(f"| {n} | {total / 2**20:.1f} | {p / 2**20:.2f} | {p / base_p:.3f} | "
              f"{kv / 2**20:.2f} | {kv / base_kv:.3f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write a tiny random-weight Hugging Face checkpoint (offline, no PyTorch).

Example: python scripts/make_tiny_model.py /tmp/tiny --arch qwen2 --hidden-size 128
"""

import argparse
import json

from jpaged.tiny import ARCHS, make_tiny_model


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("path")
    p.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--num-hidden-layers", type=int, default=2)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-key-value-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--rope-scaling", type=json.loads, default=None, help="JSON dict")
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = vars(p.parse_args())
    print(make_tiny_model(a.pop("path"), **a))


if __name__ == "__main__":
    main()

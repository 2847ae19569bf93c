"""Step sizes the runner compiles (one compiled step per token bucket)."""

from __future__ import annotations


def token_buckets(max_num_batched_tokens: int, single_token: bool = False) -> list[int]:
    """Powers of two from 8, and from 128 up also 1.5x each power of two; the
    largest is the token budget itself. ``single_token`` adds a bucket of one
    token in front (the CPU backend: XLA:CPU multiplies one row by a weight
    matrix as a matrix-vector product at the memory bandwidth, 25 GB/s here,
    but 2 to 8 rows at 14-16 GB/s, so one decoding stream padded to 8 tokens
    read its weights half as fast).

    Small steps are bound by reading the weights, so their padding is nearly
    free; large ones are bound by arithmetic, where a 128-sequence decode
    plus one 40-token prompt (168 tokens) would waste a third of a 256-token
    step (measured: 158 such steps were 46% of a 512-request CPU run).
    """
    out, b = [], 8
    while b < max_num_batched_tokens:
        out.append(b)
        if b >= 128 and b * 3 // 2 < max_num_batched_tokens:
            out.append(b * 3 // 2)
        b *= 2
    out += [max_num_batched_tokens]
    return [1] + out if single_token and max_num_batched_tokens > 1 else out


def bucket_for(buckets: list[int], n: int) -> int:
    """The smallest bucket holding ``n`` tokens."""
    for b in buckets:
        if b >= n:
            return b
    raise AssertionError(f"{n} tokens exceed max_num_batched_tokens={buckets[-1]}")

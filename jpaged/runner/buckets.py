"""Step sizes the runner compiles (one compiled step per token bucket)."""

from __future__ import annotations


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """Powers of two from 8, and from 128 up also 1.5x each power of two; the
    largest is the token budget itself.

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
    return out + [max_num_batched_tokens]


def bucket_for(buckets: list[int], n: int) -> int:
    """The smallest bucket holding ``n`` tokens."""
    for b in buckets:
        if b >= n:
            return b
    raise AssertionError(f"{n} tokens exceed max_num_batched_tokens={buckets[-1]}")

"""Step sizes the runner compiles (one compiled step per token bucket)."""

from __future__ import annotations


def token_buckets(max_num_batched_tokens: int, cpu: bool = False) -> list[int]:
    """Powers of two from 8 and 1.5x each power of two from 128 (``cpu``:
    from 16, and a bucket of one token in front); the largest is the token
    budget itself.

    A GPU step of a few dozen tokens is bound by reading the weights, so its
    padding is nearly free, but a 128-sequence decode plus one 40-token
    prompt (168 tokens) would waste a third of a 256-token step. On a CPU a
    step of 16 tokens or more is already bound by arithmetic (measured with
    the native kernels on the ~32M Llama: a 48-token step 24.3 ms, a 64-token
    one 30.3 ms; the 24 and 48 buckets cut the decode-heavy benchmark's
    device time 5.16 -> 4.86 s, and 96 a 96-sequence decode step 67.6 -> 60.1
    ms), and one decoding stream reads its weights faster as a one-row
    product than padded to 8 rows.
    """
    out, b, fine_from = [], 8, 16 if cpu else 128
    while b < max_num_batched_tokens:
        out.append(b)
        if b >= fine_from and b * 3 // 2 < max_num_batched_tokens:
            out.append(b * 3 // 2)
        b *= 2
    out += [max_num_batched_tokens]
    return [1] + out if cpu and max_num_batched_tokens > 1 else out


def bucket_for(buckets: list[int], n: int) -> int:
    """The smallest bucket holding ``n`` tokens."""
    for b in buckets:
        if b >= n:
            return b
    raise AssertionError(f"{n} tokens exceed max_num_batched_tokens={buckets[-1]}")

"""The reference backend's CPU attention (decode rows per token, prefill in
query tiles) against the plain oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.layers.attention_cpu import cpu_paged_attention
from jpaged.pallas_kernels.attention.reference import ragged_paged_attention_reference


def layout(rng, q_lens, ctx, block_size, kvh=2, g=4, d=32, pad_tokens=3):
    max_blocks = -(-max(ctx) // block_size) + 1
    nb = 1 + len(ctx) * max_blocks
    k = jnp.asarray(rng.standard_normal((nb, block_size, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((nb, block_size, kvh, d)), jnp.float32)
    tables = np.zeros((len(ctx), max_blocks), np.int32)
    ids = rng.permutation(np.arange(1, nb))
    for s in range(len(ctx)):
        tables[s] = ids[s * max_blocks:(s + 1) * max_blocks]
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(qsl[-1]) + pad_tokens
    q = jnp.asarray(rng.standard_normal((t, kvh * g, d)), jnp.float32)
    return (q, k, v, jnp.asarray(tables), jnp.asarray(ctx, jnp.int32), jnp.asarray(qsl)), d


@pytest.mark.parametrize("block_size,q_tile,chunk", [(8, 4, 16), (16, 8, 64), (16, 32, 256),
                                                     (64, 16, 128)])
@pytest.mark.parametrize("sliding_window", [None, 37])
def test_mixed_step_equals_reference(block_size, q_tile, chunk, sliding_window):
    rng = np.random.default_rng(block_size + q_tile)
    # Decode rows, prefill chunks spanning several tiles (one from the start,
    # one continuing a context), a padding sequence.
    q_lens = [1, 1, 37, 0, 5, 1, 70]
    ctx = [1, 300, 40, 0, 133, 64, 200]
    args, d = layout(rng, q_lens, ctx, block_size)
    want = ragged_paged_attention_reference(*args, scale=d ** -0.5,
                                            sliding_window=sliding_window)
    got = cpu_paged_attention(*args, scale=d ** -0.5, sliding_window=sliding_window,
                              q_tile=q_tile, chunk_tokens=chunk, decode_chunk=chunk)
    got = np.asarray(got)
    np.testing.assert_allclose(got, np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got[sum(q_lens):], 0)  # padding tokens


def test_decode_only_step_equals_reference():
    rng = np.random.default_rng(1)
    args, d = layout(rng, [1] * 6 + [0, 0], [5, 17, 64, 100, 1, 33, 0, 0], 16, pad_tokens=0)
    want = ragged_paged_attention_reference(*args, scale=d ** -0.5)
    got = cpu_paged_attention(*args, scale=d ** -0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)

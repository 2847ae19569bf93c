"""The CPU attention path (chunked online softmax) against the plain oracle."""

import numpy as np
import pytest
import jax.numpy as jnp

from jpaged.pallas_kernels.attention.reference import (ragged_paged_attention_chunked,
                                             ragged_paged_attention_reference)


@pytest.mark.parametrize("block_size,chunk", [(8, 64), (16, 64), (16, 256), (128, 128)])
@pytest.mark.parametrize("sliding_window,soft_cap", [(None, None), (37, None), (None, 5.0)])
def test_chunked_equals_reference(block_size, chunk, sliding_window, soft_cap):
    rng = np.random.default_rng(block_size + chunk)
    kvh, g, d = 2, 4, 32
    q_lens = [1, 1, 17, 0, 5, 1]  # decode rows, a prefill chunk, a padding row
    ctx = [1, 300, 40, 0, 133, 64]
    max_blocks = -(-max(ctx) // block_size) + 1
    nb = 1 + len(ctx) * max_blocks
    k = jnp.asarray(rng.standard_normal((nb, block_size, kvh, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((nb, block_size, kvh, d)), jnp.float32)
    tables = np.zeros((len(ctx), max_blocks), np.int32)
    ids = rng.permutation(np.arange(1, nb))
    for s in range(len(ctx)):
        tables[s] = ids[s * max_blocks:(s + 1) * max_blocks]
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(qsl[-1]) + 3  # padding tokens at the end
    q = jnp.asarray(rng.standard_normal((t, kvh * g, d)), jnp.float32)
    args = (q, k, v, jnp.asarray(tables), jnp.asarray(ctx, jnp.int32), jnp.asarray(qsl))
    kw = dict(scale=d ** -0.5, sliding_window=sliding_window, soft_cap=soft_cap)
    want = ragged_paged_attention_reference(*args, **kw)
    got = ragged_paged_attention_chunked(*args, chunk_tokens=chunk, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_array_equal(np.asarray(got)[int(qsl[-1]):], 0)

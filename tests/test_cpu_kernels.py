"""The native CPU kernels (jpaged/cpu_kernels): paged attention against the
oracle, the few-row matrix product against numpy, and their dispatch: the
engine's CPU steps run them, and fall back to XLA where they do not apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import cpu_kernels
from jpaged.layers.attention_cpu import cpu_paged_attention, native_applies
from jpaged.pallas_kernels.attention.reference import ragged_paged_attention_reference


def layout(rng, q_lens, ctx, block_size, kvh, g, d, pad_tokens=3, dtype=jnp.float32):
    max_blocks = -(-max(ctx) // block_size) + 1
    nb = 1 + len(ctx) * max_blocks
    k = jnp.asarray(rng.standard_normal((nb, block_size, kvh, d)), dtype)
    v = jnp.asarray(rng.standard_normal((nb, block_size, kvh, d)), dtype)
    tables = np.zeros((len(ctx), max_blocks), np.int32)
    ids = rng.permutation(np.arange(1, nb))  # blocks anywhere in the cache
    for s in range(len(ctx)):
        tables[s] = ids[s * max_blocks:(s + 1) * max_blocks]
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(qsl[-1]) + pad_tokens
    q = jnp.asarray(rng.standard_normal((t, kvh * g, d)), dtype)
    return q, k, v, jnp.asarray(tables), jnp.asarray(ctx, jnp.int32), jnp.asarray(qsl)


def native(*args, **kw):
    return jax.jit(lambda *a: cpu_kernels.paged_attention(*a, **kw))(*args)


def test_kernel_builds():
    # CI and the README's setup have a C++ compiler: the kernel must build
    # there, not silently fall back to XLA.
    assert cpu_kernels.load() is not None, cpu_kernels.unavailable_reason()


@pytest.mark.parametrize("block_size", [8, 16, 64])
@pytest.mark.parametrize("kvh,g,d", [(2, 4, 64), (3, 3, 64), (1, 1, 128), (2, 2, 128)])
@pytest.mark.parametrize("sliding_window", [None, 37])
def test_mixed_step_equals_reference(block_size, kvh, g, d, sliding_window):
    rng = np.random.default_rng(block_size + 7 * kvh + g + d)
    # Decodes (one at the first position), prefill chunks over several query
    # tiles (from the start, and continuing a context), an empty sequence.
    q_lens = [1, 1, 37, 0, 5, 1, 70]
    ctx = [1, 300, 40, 0, 133, 64, 200]
    args = layout(rng, q_lens, ctx, block_size, kvh, g, d)
    want = ragged_paged_attention_reference(*args, scale=d ** -0.5,
                                            sliding_window=sliding_window)
    got = np.asarray(native(*args, scale=d ** -0.5, sliding_window=sliding_window))
    np.testing.assert_allclose(got, np.asarray(want), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(got[sum(q_lens):], 0)  # padding tokens


def test_decode_only_and_long_context():
    rng = np.random.default_rng(3)
    ctx = [1, 17, 64, 1000, 15, 16, 0, 0]
    args = layout(rng, [1] * 6 + [0, 0], ctx, 16, 2, 4, 64, pad_tokens=2)
    want = ragged_paged_attention_reference(*args, scale=0.125)
    got = native(*args, scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_bfloat16():
    rng = np.random.default_rng(4)
    args = layout(rng, [1, 30, 1], [50, 90, 7], 16, 2, 4, 64, dtype=jnp.bfloat16)
    want = ragged_paged_attention_reference(
        *[a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args], scale=0.125)
    got = native(*args, scale=0.125)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2)


def test_large_scores_stay_finite():
    # Scores of several hundred: the softmax must subtract the running max.
    rng = np.random.default_rng(5)
    q, k, v, bt, cl, qsl = layout(rng, [3, 1], [40, 80], 16, 2, 4, 64)
    q, k = q * 30, k * 30
    want = ragged_paged_attention_reference(q, k, v, bt, cl, qsl, scale=0.125)
    got = np.asarray(native(q, k, v, bt, cl, qsl, scale=0.125))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise():
    rng = np.random.default_rng(6)
    q, k, v, bt, cl, qsl = layout(rng, [1, 2], [5, 9], 16, 2, 4, 64)
    with pytest.raises(ValueError, match="must match"):
        cpu_kernels.paged_attention(q, k.astype(jnp.bfloat16), v, bt, cl, qsl, scale=0.1)
    with pytest.raises(Exception, match="block id out of range"):
        native(q, k, v, bt.at[1, 0].set(k.shape[0]), cl, qsl, scale=0.1).block_until_ready()
    with pytest.raises(Exception, match="more query tokens than context"):
        native(q, k, v, bt, cl.at[1].set(1), qsl, scale=0.1).block_until_ready()


def test_dispatch(monkeypatch):
    rng = np.random.default_rng(7)
    q, k, v, bt, cl, qsl = layout(rng, [1, 2], [5, 9], 16, 2, 4, 64)
    assert native_applies(q, k)
    assert not native_applies(q[..., :32], k[..., :32])  # head_dim 32: XLA
    assert not native_applies(q, k.astype(jnp.float8_e4m3fn), 0.5, 0.5)  # fp8 cache
    assert not native_applies(q, k.astype(jnp.bfloat16))  # mixed dtypes
    monkeypatch.setenv("JPAGED_CPU_KERNELS", "xla")
    assert not native_applies(q, k)
    monkeypatch.setenv("JPAGED_CPU_KERNELS", "native")
    with pytest.raises(ValueError, match="head_dim 32"):
        native_applies(q[..., :32], k[..., :32])
    monkeypatch.setenv("JPAGED_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="JPAGED_CPU_KERNELS='fast'"):
        native_applies(q, k)
    monkeypatch.delenv("JPAGED_CPU_KERNELS")

    def hlo(**kw):
        f = jax.jit(lambda *a: cpu_paged_attention(*a, scale=0.125, **kw))
        return f.lower(q, k, v, bt, cl, qsl).as_text()

    assert cpu_kernels.TARGET in hlo()
    assert cpu_kernels.TARGET not in hlo(native=False)
    # Both paths give the reference's numbers.
    want = ragged_paged_attention_reference(q, k, v, bt, cl, qsl, scale=0.125)
    for kw in ({}, {"native": False}):
        got = cpu_paged_attention(q, k, v, bt, cl, qsl, scale=0.125, **kw)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_build_failure_falls_back(monkeypatch, tmp_path):
    # No compiler: auto falls back to XLA with the reason kept; native raises.
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("JPAGED_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    assert cpu_kernels.load() is None
    assert "cannot run the C++ compiler" in cpu_kernels.unavailable_reason()
    assert not cpu_kernels.use_native_attention(jnp.float32, jnp.float32)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("JPAGED_CPU_KERNELS", "native")
    with pytest.raises(RuntimeError, match="cannot run the C\\+\\+ compiler"):
        cpu_kernels.load()
    # Nothing to run at all: the same, said plainly.
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.delenv("CXX")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_kernels.load()


@pytest.mark.parametrize("m", [2, 3, 5, 6, 7, 8, 9, 13, 16, 17, 24, 32, 33, 47, 48, 49, 64])
@pytest.mark.parametrize("k,n", [(1, 4), (15, 8), (16, 12), (17, 20), (576, 96), (100, 1000)])
def test_matmul_equals_numpy(m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.matmul_nt)(jnp.asarray(x), jnp.asarray(w)))
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_matmul_dispatch(monkeypatch):
    from jpaged.layers.linear import dense, quantize_int8

    x = jnp.ones((8, 64), jnp.float32)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((32, 64)), jnp.float32)

    def lowered(x, w):  # a fresh function each time: jit's trace cache ignores the context
        return jax.jit(lambda x, w: dense(x, w)).lower(x, w).as_text()

    assert not cpu_kernels.native_matmul_applies(x, w)  # not inside single_device
    with cpu_kernels.single_device():
        assert cpu_kernels.native_matmul_applies(x, w)
        assert not cpu_kernels.native_matmul_applies(x[:1], w)  # one row: XLA's gemv
        assert not cpu_kernels.native_matmul_applies(
            jnp.ones((cpu_kernels.MATMUL_MAX_ROWS + 1, 64)), w)
        assert not cpu_kernels.native_matmul_applies(x.astype(jnp.bfloat16),
                                                      w.astype(jnp.bfloat16))
        assert not cpu_kernels.native_matmul_applies(x, w[:30])  # out not a multiple of 4
        assert cpu_kernels.MATMUL_TARGET in lowered(x, w)
        np.testing.assert_allclose(np.asarray(jax.jit(dense)(x, w)), np.asarray(x @ w.T),
                                   rtol=1e-5, atol=1e-5)
        # Quantized weights keep their own paths.
        assert cpu_kernels.MATMUL_TARGET not in lowered(x, quantize_int8(np.asarray(w)))
        monkeypatch.setenv("JPAGED_CPU_KERNELS", "xla")
        assert cpu_kernels.MATMUL_TARGET not in lowered(x, w)
    monkeypatch.delenv("JPAGED_CPU_KERNELS")
    assert cpu_kernels.MATMUL_TARGET not in lowered(x, w)


def mlp_numpy(x, gate_up, down):
    x, gate_up, down = (a.astype(np.float64) for a in (x, gate_up, down))
    i = gate_up.shape[0] // 2
    g, u = x @ gate_up[:i].T, x @ gate_up[i:].T
    return (g / (1 + np.exp(-g)) * u) @ down.T


# Rows: one vector (tiles of 8 intermediate columns), then blocks of 48 and
# their tails; intermediate sizes with and without a tile of 4 left over.
@pytest.mark.parametrize("m", [1, 9, 16, 17, 33, 48, 49, 96, 130])
@pytest.mark.parametrize("k,i,n", [(64, 32, 64), (100, 44, 20), (17, 12, 8), (576, 1536, 576)])
def test_mlp_equals_numpy(m, k, i, n):
    rng = np.random.default_rng(m * 1000 + k + i + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    gate_up = (rng.standard_normal((2 * i, k)) * 2 / np.sqrt(k)).astype(np.float32)
    down = (rng.standard_normal((n, i)) / np.sqrt(i)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.mlp)(*map(jnp.asarray, (x, gate_up, down))))
    np.testing.assert_allclose(got, mlp_numpy(x, gate_up, down), rtol=1e-5,
                               atol=2e-5 * np.sqrt(k))


def test_mlp_bad_shapes_raise():
    x, gu, down = jnp.ones((16, 64)), jnp.ones((64, 64)), jnp.ones((32, 32))
    jax.jit(cpu_kernels.mlp)(x, gu, down).block_until_ready()
    for args in ((x, gu[:, :32], down), (x, gu[:60], down), (x, gu, down[:, :16]),
                 (x, gu, down[:30])):
        with pytest.raises(Exception, match="gate_up|multiples of 4"):
            jax.jit(cpu_kernels.mlp)(*args).block_until_ready()


def test_mlp_dispatch():
    x, gu, down = jnp.ones((16, 64)), jnp.ones((64, 64)), jnp.ones((32, 32))
    assert not cpu_kernels.native_mlp_applies(x, gu, down)  # not inside single_device
    with cpu_kernels.single_device():
        assert cpu_kernels.native_mlp_applies(x, gu, down)
        assert not cpu_kernels.native_mlp_applies(x[:cpu_kernels.MLP_MIN_ROWS - 1], gu, down)
        assert not cpu_kernels.native_mlp_applies(
            jnp.ones((cpu_kernels.MLP_MAX_ROWS + 1, 64)), gu, down)
        assert not cpu_kernels.native_mlp_applies(x.astype(jnp.bfloat16), gu, down)
        assert cpu_kernels.native_mlp_applies(x, gu[:56], down[:, :28])  # I = 28
        assert not cpu_kernels.native_mlp_applies(x, gu[:60], down[:, :30])  # I = 30
        assert not cpu_kernels.native_mlp_applies(x, gu, down[:, :16])  # down's in is not I
        assert not cpu_kernels.native_mlp_applies(x, gu, down[:30])  # out not a multiple of 4


def test_engine_step_runs_the_kernel(tmp_path):
    """A CPU engine's compiled step calls the kernel, and greedy decoding
    gives the same tokens as with XLA's attention."""
    pytest.importorskip("flax")  # not on the jax-only Python 3.12 kernel leg
    from jpaged import LLM, SamplingParams
    from jpaged.tiny import make_tiny_model

    model = str(tmp_path / "m")
    make_tiny_model(model, arch="llama", vocab_size=512, hidden_size=256,
                    intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512)
    prompts = [[5 + i, 9, 17, 33 + i, 2] * (1 + 3 * i) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for mode in ("native", "xla"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("JPAGED_CPU_KERNELS", mode)
            big = 2 * cpu_kernels.MATMUL_MAX_ROWS
            llm = LLM(model, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=big,
                      block_size=16, compile_all_buckets=False)
            runner = llm.llm_engine.runner
            text = runner._lower(runner._step_avals(), big, False)[1].as_text()
            assert (cpu_kernels.TARGET in text) == (mode == "native")
            # More token rows than the native product takes: XLA's products
            # and the first layer's MLP fused; the last layer past its K/V
            # write runs on the 4 sample rows (o_proj, gate_up and down
            # natively), then the lm_head.
            assert text.count(f"@{cpu_kernels.MATMUL_TARGET}(") == 4 * (mode == "native")
            assert text.count(f"@{cpu_kernels.MLP_TARGET}(") == (mode == "native")
            text = runner._lower(runner._step_avals(), 8, False)[1].as_text()
            assert (cpu_kernels.MATMUL_TARGET in text) == (mode == "native")
            outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["native"] == outs["xla"]


@pytest.mark.parametrize("n", [1, 5, 16, 17, 100, 49152])
def test_argmax_rows_equals_jnp_argmax(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((7, n)).astype(np.float32)
    x[1, [0, n // 2, n - 1]] = 50.0  # ties: the first wins
    x[2, :] = -np.inf  # every token banned
    x[3, [n - 1, n // 3]] = np.nan  # the first NaN, like jnp.argmax
    x[4, n - 1] = 1e30  # the last column (in the scalar tail when n % 16)
    x[5, :] = 0.0
    x[6, :] = rng.integers(0, 3, n)  # many ties across vector lanes
    want = np.asarray(jnp.argmax(jnp.asarray(x), axis=-1))
    got = np.asarray(jax.jit(cpu_kernels.argmax_rows)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)


def test_argmax_dispatch():
    from jpaged.sample.sampler import argmax_last

    x = jnp.zeros((4, 64), jnp.float32)
    with cpu_kernels.single_device():
        text = jax.jit(lambda a: argmax_last(a)).lower(x).as_text()
    assert cpu_kernels.ARGMAX_TARGET in text
    assert cpu_kernels.ARGMAX_TARGET not in jax.jit(lambda a: argmax_last(a)).lower(x).as_text()

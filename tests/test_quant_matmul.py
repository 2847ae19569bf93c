"""The Pallas quantized-weight matmul against the reference `dense`.

Every weight layout the loaders produce (int8 per channel, int8 grouped as
GGUF Q8_0, int8 with a zero point, int4 with a zero point as GPTQ/AWQ/our
``int4``, signed int4 as GGUF Q4_0, int4 with a minimum as GGUF Q4_1, fp8 per
channel, and GPTQ's act-order permutation) runs through the kernel and is
compared with ``dense`` (dequantize in float32, then matmul) on the same
inputs, by ||out - ref|| / ||ref||: float32 activations 1e-5 (IEEE f32 dots
over exactly dequantized tiles), bfloat16 2e-2 (the dequantized tile is
rounded to bf16 before the dot, as in the reference's cast).

``TestQuantMatmulInterpret`` runs the Pallas interpreter on CPU;
``TestQuantMatmulGPU`` runs Triton on a GPU (skipped without one, failed
when ``JPAGED_TEST_PLATFORM=cuda`` asked for one); the lowering tests lower
each layout for an abstract H100 on CPU and check the emitted dots.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import require_gpu_or_skip
from test_kernel_lowering import lower_for_h100

from jpaged.layers import linear
from jpaged.layers.linear import QuantizedWeight, pack_int4
from jpaged.pallas_kernels import quant_matmul as qm

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _grouped(rng, out, n, group, *, bits, zero=False, minimum=False):
  groups = n // group
  scale = rng.uniform(0.01, 0.1, (out, groups)).astype(np.float32)
  if bits == 8:
    q = rng.integers(-127, 128, (out, n)).astype(np.int8)
    z = rng.integers(-8, 8, (out, groups)).astype(np.int8) if zero else None
  else:
    q = pack_int4(rng.integers(0, 16, (out, n)))
    z = rng.integers(0, 16, (out, groups)).astype(np.uint8) if zero else None
  m = rng.uniform(-0.5, 0.0, (out, groups)).astype(np.float32) if minimum else None
  return QuantizedWeight(q, scale, zero=z, min=m, bits=bits, group_size=group)


def make_weight(layout: str, out: int, n: int, seed: int = 0) -> QuantizedWeight:
  rng = np.random.default_rng(seed)
  dense_w = rng.standard_normal((out, n)).astype(np.float32)
  if layout == "int8":
    w = linear.quantize_int8(dense_w)
  elif layout == "fp8":
    w = linear.quantize_fp8(dense_w)
  elif layout == "int4":
    w = linear.quantize_int4(dense_w, 128)
  elif layout == "q8_0":
    w = _grouped(rng, out, n, 32, bits=8)
  elif layout == "int8_zero":
    w = _grouped(rng, out, n, 64, bits=8, zero=True)
  elif layout == "q4_0":
    w = _grouped(rng, out, n, 32, bits=4)
  elif layout == "q4_1":
    w = _grouped(rng, out, n, 32, bits=4, minimum=True)
  elif layout == "gptq_act_order":
    w = dataclasses.replace(_grouped(rng, out, n, 64, bits=4, zero=True),
                            perm=rng.permutation(n).astype(np.int32))
  else:
    raise AssertionError(layout)
  return linear.to_device(w)


LAYOUTS = ["int8", "fp8", "int4", "q8_0", "int8_zero", "q4_0", "q4_1", "gptq_act_order"]


def rel_err(y, ref):
  y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(y).all()
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def check(layout, tokens, dtype, interpret, out=256, n=512, **kw):
  w = make_weight(layout, out, n, seed=tokens)
  x = jnp.asarray(np.random.default_rng(tokens + 1).standard_normal((tokens, n)), dtype)
  y = qm.quant_matmul(x, w, interpret=interpret, **kw)
  assert y.shape == (tokens, out) and y.dtype == dtype
  # The reference: dequantize, then an IEEE float32 matmul (not `dense`, which
  # on a GPU may itself pick the kernel or fp8 tensor cores; XLA's default for
  # float32 dots on a GPU is TF32).
  with jax.default_matmul_precision("highest"):
    ref = x.astype(jnp.float32) @ linear.dequantize(w).T
  err = rel_err(y, ref)
  assert err < RTOL[dtype], f"{layout} T={tokens} {jnp.dtype(dtype).name}: rel err {err:.2e}"


class TestQuantMatmulInterpret:
  @pytest.mark.parametrize("layout", LAYOUTS)
  def test_layouts_f32(self, layout):
    check(layout, 5, jnp.float32, True)

  @pytest.mark.parametrize("layout", ["int8", "int4", "q4_1", "fp8"])
  def test_layouts_bf16(self, layout):
    check(layout, 3, jnp.bfloat16, True)

  @pytest.mark.parametrize("tokens", [1, 16, 17])
  def test_token_counts_and_tiles(self, tokens):
    # T padded to block_t (16 or 32) and sliced back; narrow and wide block_n.
    check("int4", tokens, jnp.float32, True, block_n=32)
    check("int8", tokens, jnp.float32, True, block_n=128)

  @pytest.mark.parametrize("layout", ["int8", "q4_1", "gptq_act_order"])
  def test_split_k(self, layout):
    # 3 splits of 4 (int8) or 16 (4-bit) tiles: uneven, the last split may be empty.
    check(layout, 2, jnp.float32, True, num_splits=3)
    check(layout, 2, jnp.bfloat16, True, num_splits=16)
    assert qm.default_num_splits(8, 112) == 28 and qm.default_num_splits(448, 112) == 1

  def test_unsupported_layouts_are_refused(self):
    w = make_weight("int8", 96, 512)  # 96 output channels: no block of 64 divides
    x = jnp.ones((2, 512), jnp.float32)
    with pytest.raises(ValueError, match="96 output channels in blocks of 64"):
      qm.quant_matmul(x, w, block_n=64, interpret=True)
    w4 = linear.to_device(QuantizedWeight(pack_int4(np.zeros((64, 512), np.uint8)),
                                          np.ones((64, 1), np.float32), bits=4,
                                          group_size=512))
    assert "one scale per output channel" in qm.unsupported_reason((2, 512), jnp.float32,
                                                                   w4, 32)
    w8 = linear.to_device(QuantizedWeight(np.zeros((64, 48), np.int8),
                                          np.ones((64, 2), np.float32), group_size=24))
    assert "a tile of 24 stored columns" in qm.unsupported_reason((2, 48), jnp.float32, w8, 32)


class TestQuantMatmulGPU:
  @pytest.fixture(autouse=True)
  def _gpu(self):
    require_gpu_or_skip("Triton kernels")

  @pytest.mark.parametrize("layout", LAYOUTS)
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  @pytest.mark.parametrize("tokens", [1, 300])
  def test_layouts(self, layout, dtype, tokens):
    check(layout, tokens, dtype, False, out=512, n=1024)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("tokens", [1, 256])
def test_lowers_for_h100(layout, tokens):
  w = make_weight(layout, 1024, 512)
  x = jax.ShapeDtypeStruct((tokens, 512), jnp.bfloat16)
  text = lower_for_h100(lambda x, w: qm.quant_matmul(x, w), x, w)
  assert "__gpu$xla.gpu.triton" in text


def test_fp8_values_survive_the_bf16_upcast():
  # Every finite e4m3 value is exact in bf16, which the per-channel path relies on.
  vals = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  vals = vals[np.isfinite(vals)]
  assert np.array_equal(vals.astype(ml_dtypes.bfloat16).astype(np.float32), vals)


# ------------------------------------------------- dispatch from linear.dense
def _has_pallas_call(f, *args) -> bool:
  return "pallas_call" in str(jax.make_jaxpr(lambda *a: f(*a))(*args))


@pytest.mark.parametrize("layout", ["int8", "q4_1"])
def test_dense_dispatch(monkeypatch, layout):
  w = make_weight(layout, 256, 512)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 512)), jnp.float32)
  bias = jnp.arange(256, dtype=jnp.float32)
  def f(x):  # a new function each time: jit's trace cache does not see the variable
    return (lambda x: linear.dense(x, w, bias))(x)
  monkeypatch.setenv(linear.QUANT_MATMUL_ENV, "xla")
  assert not _has_pallas_call(f, x)
  with jax.default_matmul_precision("highest"):  # XLA on GPUs: TF32 otherwise
    ref = f(x)
  monkeypatch.setenv(linear.QUANT_MATMUL_ENV, "pallas")  # on CPU: the interpreter
  assert _has_pallas_call(f, x)
  assert rel_err(f(x), ref) < 1e-5
  monkeypatch.setenv(linear.QUANT_MATMUL_ENV, "auto")  # CPU: XLA; GPU: the kernel
  assert _has_pallas_call(f, x) == (jax.default_backend() == "gpu")
  # Prefill-sized batches stay on XLA's fused dequantize + GEMM.
  big = jnp.zeros((linear.PALLAS_MAX_TOKENS + 1, 512), jnp.float32)
  assert not _has_pallas_call(f, big)


def test_dense_dispatch_errors(monkeypatch):
  w = make_weight("int8", 72, 512)
  x = jnp.ones((2, 512), jnp.float32)
  monkeypatch.setenv(linear.QUANT_MATMUL_ENV, "triton")
  with pytest.raises(ValueError, match="JPAGED_QUANT_MATMUL='triton' is not one of"):
    linear.dense(x, w)
  for choice in ("pallas", "auto"):  # a shape the kernel does not take: XLA
    monkeypatch.setenv(linear.QUANT_MATMUL_ENV, choice)
    assert not _has_pallas_call(lambda x: linear.dense(x, w), x)
    assert linear.dense(x, w).shape == (2, 72)


def test_fp8_w8a8_dense():
  w = make_weight("fp8", 256, 512)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((8, 512)), jnp.bfloat16)
  y = jax.jit(linear.fp8_w8a8_dense)(x, w)
  assert y.shape == (8, 256) and y.dtype == jnp.bfloat16
  err = rel_err(y, linear.dense(x.astype(jnp.float32), w))
  assert 1e-3 < err < 6e-2, err  # the activations are rounded to e4m3: not exact
  with pytest.raises(ValueError, match="needs e4m3 weights"):
    linear.fp8_w8a8_dense(x, make_weight("int8", 256, 512))


# The Python 3.12 kernel leg (scripts/test_kernels_py312.sh) installs jax alone.
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("flax") is None,
                    reason="the engine needs flax and transformers")
def test_engine_runs_the_kernel(monkeypatch, llama_dir):
  """An int8 model in the engine: the step calls the kernel when asked (the
  interpreter on CPU) and decodes the same greedy tokens as XLA's fused path."""
  calls = []
  original = qm.quant_matmul

  def counting(*a, **kw):
    calls.append(a[0].shape)
    return original(*a, **kw)

  monkeypatch.setattr(qm, "quant_matmul", counting)
  tokens = {}
  # float32 model: XLA's own dots must be IEEE too on a GPU (TF32 by default);
  # set globally, not as a context, which warm-up threads would not see.
  before = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", "highest")
  try:
    _generate_both(monkeypatch, llama_dir, calls, tokens)
  finally:
    jax.config.update("jax_default_matmul_precision", before)
  assert tokens["pallas"] == tokens["xla"]


def _generate_both(monkeypatch, llama_dir, calls, tokens):
  from jpaged import LLM, SamplingParams

  for choice in ("xla", "pallas"):
    monkeypatch.setenv(linear.QUANT_MATMUL_ENV, choice)
    llm = LLM(model=llama_dir, quantization="int8", max_num_seqs=2,
              max_num_batched_tokens=64, max_model_len=128, compile_all_buckets=False,
              num_kv_blocks=64)  # not 90% of a GPU that other test workers share
    outs = llm.generate(["Hello there", "The capital"],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    tokens[choice] = [o.outputs[0].token_ids for o in outs]
    assert bool(calls) == (choice == "pallas"), (choice, calls)
    del llm


@pytest.mark.parametrize("layout", ["int8", "int4", "q4_1"])
def test_lowers_for_h100_at_model_widths(layout):
  # Row widths that are not powers of two (SmolLM2's 576 and 1536, Llama-3-8B's
  # 14336): the kernel's ref spans the whole row; only its loaded tiles must be
  # powers of two.
  for n in (576, 1536, 14336):
    w = make_weight(layout, 192, n)
    lower_for_h100(lambda x, w: qm.quant_matmul(x, w), jax.ShapeDtypeStruct((3, n), jnp.bfloat16), w)


def test_auto_policy_on_a_gpu(monkeypatch):
  """What "auto" picks on an H100 (the GPU faked: only the decision is traced)."""
  monkeypatch.setattr(linear.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(linear, "_gpu_has_fp8_dots", lambda: True)
  monkeypatch.delenv(linear.QUANT_MATMUL_ENV, raising=False)
  pick = lambda layout, t: linear.quant_matmul_backend(  # noqa: E731
      t, jnp.bfloat16, make_weight(layout, 256, 512))
  assert [pick("int8", t) for t in (1, 256, 257)] == ["pallas", "pallas", "xla"]
  assert [pick("q4_1", t) for t in (1, 256, 2048)] == ["pallas", "pallas", "xla"]
  assert [pick("fp8", t) for t in (1, 64, 127, 128, 2048)] == [
      "pallas", "pallas", "pallas", "fp8_w8a8", "fp8_w8a8"]
  monkeypatch.setattr(linear, "_gpu_has_fp8_dots", lambda: False)  # e.g. an A100
  assert pick("fp8", 2048) == "xla"
  monkeypatch.setenv(linear.QUANT_MATMUL_ENV, "fp8_w8a8")
  assert pick("fp8", 1) == "fp8_w8a8" and pick("int8", 1) == "xla"


def test_dense_fp8_w8a8_path(monkeypatch):
  w = make_weight("fp8", 256, 512)
  x = jnp.asarray(np.random.default_rng(9).standard_normal((8, 512)), jnp.float32)
  monkeypatch.setenv(linear.QUANT_MATMUL_ENV, "fp8_w8a8")
  y = linear.dense(x, w, jnp.ones((256,), jnp.float32))
  np.testing.assert_allclose(np.asarray(y), np.asarray(linear.fp8_w8a8_dense(x, w)) + 1.0,
                             rtol=1e-6)

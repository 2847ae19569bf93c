"""Pallas paged-attention kernels against the jnp reference.

``TestKernels`` runs the Triton kernels on a GPU: skipped without one, but
failed when the session was asked for a GPU (``JPAGED_TEST_PLATFORM=cuda``,
see conftest.py) and none is visible. ``TestKernelsInterpret`` runs the same
cases through the Pallas interpreter on CPU. The cross product of head_dim x GQA x block size x length x dtype is
pruned to one axis at a time so that the interpreted class stays fast.

Tolerances, as ||out - ref|| / ||ref|| with the reference in f32 math on the
same inputs (``default_matmul_precision("highest")``: XLA's default for
float32 dots on an H100 is TF32, which put the reference itself 1e-4 to
3e-4 off and failed the float32 cases with more than one query head per KV
head, seen on 2026-11-26): float32 1e-4, which holds because the kernels ask for IEEE f32
dots (``precision=HIGHEST``; Triton's default for f32 is TF32, whose 10-bit
mantissa gave 1.1e-4 to 3e-4 on an H200, see test_kernel_lowering for the
check of the emitted dot precision; the interpreter lands near 1e-7);
bfloat16 / float16 2e-2 (probabilities are rounded to the cache dtype before
the P.V dot, as in every flash kernel). NaN never passes; padding rows and
tokens must be exactly zero.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_gpu_or_skip

from jpaged.pallas_kernels.attention.decode import paged_decode_attention
from jpaged.pallas_kernels.attention.ragged import ragged_paged_attention
from jpaged.pallas_kernels.attention.reference import (
    paged_decode_attention_reference, ragged_paged_attention_reference)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

RTOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}


def make_case(seed, seqs, *, block_size=16, num_kv_heads=2, group=4, head_dim=64,
              dtype=jnp.float32, pad_tokens=3, poison=False):
  """Random paged inputs.

  Args:
    seed: PRNG seed.
    seqs: ``[(query_len, context_len)]``; ``(0, 0)`` is a padding sequence.
    block_size, num_kv_heads, group, head_dim, dtype: cache geometry.
    pad_tokens: padding query tokens after the real ones.
    poison: fill every cache slot that no sequence may read (null block,
      tails of last blocks, unused blocks) with NaN, for the kernel only.

  Returns:
    dict with q, k, v (clean), k_run, v_run (possibly poisoned),
    block_tables, context_lens, query_start_loc.
  """
  rng = np.random.default_rng(seed)
  num_heads = num_kv_heads * group
  need = [math.ceil(c / block_size) for _, c in seqs]
  # A table wider than needed and usually not a power of two.
  max_blocks = max(need + [1]) + 3
  num_blocks = sum(need) + 4
  ids = rng.permutation(np.arange(1, num_blocks))
  # Entries past a sequence's blocks: stale ids (they must never be read).
  tables = rng.integers(0, num_blocks, (len(seqs), max_blocks)).astype(np.int32)
  readable = np.zeros((num_blocks, block_size), bool)
  off = 0
  for s, (_, c) in enumerate(seqs):
    tables[s, :need[s]] = ids[off:off + need[s]]
    for j in range(need[s]):
      n = min(block_size, c - j * block_size)
      readable[ids[off + j], :n] = True
    off += need[s]
  q_lens = np.array([ql for ql, _ in seqs], np.int32)
  qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  num_tokens = int(qsl[-1]) + pad_tokens
  shape = (num_blocks, block_size, num_kv_heads, head_dim)
  k = rng.standard_normal(shape).astype(np.float32)
  v = rng.standard_normal(shape).astype(np.float32)
  q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float32)
  k_run, v_run = k.copy(), v.copy()
  if poison:
    k_run[~readable] = np.nan
    v_run[~readable] = np.nan
  return dict(
      q=jnp.asarray(q, dtype), k=jnp.asarray(k, dtype), v=jnp.asarray(v, dtype),
      k_run=jnp.asarray(k_run, dtype), v_run=jnp.asarray(v_run, dtype),
      block_tables=jnp.asarray(tables),
      context_lens=jnp.asarray([c for _, c in seqs], jnp.int32),
      query_start_loc=jnp.asarray(qsl), num_real_tokens=int(qsl[-1]))


def assert_close(out, ref, dtype, zero_rows=None):
  out = np.asarray(out.astype(jnp.float32))
  ref = np.asarray(ref.astype(jnp.float32))
  assert not np.isnan(out).any(), "NaN in kernel output"
  if zero_rows is not None:
    assert np.all(out[zero_rows] == 0), "padding rows must be zeros"
  err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
  assert err < RTOL[dtype], f"relative error {err:.3g} >= {RTOL[dtype]}"


class TestKernels:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET:
      require_gpu_or_skip("Triton kernels")

  # -- decode ---------------------------------------------------------------

  def check_decode(self, ctx_lens, dtype=jnp.float32, poison=False,
                   soft_cap=None, sliding_window=None, **kw):
    geometry = {n: kw.pop(n) for n in ("block_size", "num_kv_heads", "group", "head_dim")
                if n in kw}
    case = make_case(len(ctx_lens) * 7 + sum(ctx_lens), [(1 if c else 0, c) for c in ctx_lens],
                     dtype=dtype, pad_tokens=0, poison=poison, **geometry)
    # Decode q is one row per sequence, padding sequences included.
    q = jax.random.normal(jax.random.key(sum(ctx_lens)),
                          (len(ctx_lens),) + case["q"].shape[1:]).astype(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    args = (case["block_tables"], case["context_lens"])
    out = paged_decode_attention(q, case["k_run"], case["v_run"], *args, scale=scale,
                                 soft_cap=soft_cap, sliding_window=sliding_window,
                                 interpret=self.INTERPRET, **kw)
    with jax.default_matmul_precision("highest"):  # XLA on GPUs: TF32 otherwise
      ref = paged_decode_attention_reference(q, case["k"], case["v"], *args, scale=scale,
                                             soft_cap=soft_cap, sliding_window=sliding_window)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype, zero_rows=np.array(ctx_lens) == 0)

  @pytest.mark.parametrize("head_dim", [64, 128])
  @pytest.mark.parametrize("group", [1, 4, 8])
  def test_decode_heads(self, head_dim, group):
    self.check_decode([1, 37, 0, 16], head_dim=head_dim, group=group, num_kv_heads=2)

  @pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
  def test_decode_block_sizes(self, block_size):
    bs = block_size
    self.check_decode([1, bs, 3 * bs + 5, 0, 2 * bs - 1], block_size=bs)

  @pytest.mark.parametrize("num_splits,pages", [(1, 1), (3, 2), (8, 4)])
  def test_decode_splits(self, num_splits, pages):
    self.check_decode([100, 0, 5, 33], num_splits=num_splits,
                      pages_per_compute_block=pages)

  @pytest.mark.parametrize("soft_cap,window", [(5.0, None), (None, 20), (2.0, 1)])
  def test_decode_soft_cap_window(self, soft_cap, window):
    self.check_decode([1, 50, 0, 19], soft_cap=soft_cap, sliding_window=window)

  @pytest.mark.parametrize("dtype,head_dim,group", [
      (jnp.bfloat16, 128, 8), (jnp.bfloat16, 64, 1), (jnp.float16, 128, 4)])
  def test_decode_half(self, dtype, head_dim, group):
    self.check_decode([1, 70, 0, 33], dtype=dtype, head_dim=head_dim, group=group)

  def test_decode_never_reads_unowned_slots(self):
    # Null block, tails of last blocks, stale table entries: all NaN.
    self.check_decode([1, 37, 0, 64, 3], poison=True)
    self.check_decode([1, 37, 0, 64, 3], poison=True, num_splits=1, sliding_window=9)

  def test_decode_long(self):
    self.check_decode([3000, 1, 0, 1234], dtype=jnp.bfloat16, group=8, head_dim=128)

  # -- ragged ---------------------------------------------------------------

  def check_ragged(self, seqs, dtype=jnp.float32, poison=False, pad_tokens=5,
                   soft_cap=None, sliding_window=None, **kw):
    geometry = {n: kw.pop(n) for n in ("block_size", "num_kv_heads", "group", "head_dim")
                if n in kw}
    case = make_case(len(seqs) + sum(c for _, c in seqs), seqs, dtype=dtype,
                     pad_tokens=pad_tokens, poison=poison, **geometry)
    q = case["q"]
    scale = 1.0 / math.sqrt(q.shape[-1])
    args = (case["block_tables"], case["context_lens"], case["query_start_loc"])
    out = ragged_paged_attention(q, case["k_run"], case["v_run"], *args, scale=scale,
                                 soft_cap=soft_cap, sliding_window=sliding_window,
                                 interpret=self.INTERPRET, **kw)
    with jax.default_matmul_precision("highest"):  # XLA on GPUs: TF32 otherwise
      ref = ragged_paged_attention_reference(q, case["k"], case["v"], *args, scale=scale,
                                             soft_cap=soft_cap, sliding_window=sliding_window)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype, zero_rows=slice(case["num_real_tokens"], None))

  # (query_len, context_len): decode, whole prompt, chunk with history, padding.
  MIXED = [(1, 37), (20, 20), (0, 0), (13, 50), (1, 1)]

  @pytest.mark.parametrize("head_dim", [64, 128])
  @pytest.mark.parametrize("group", [1, 4, 8])
  def test_ragged_heads(self, head_dim, group):
    self.check_ragged(self.MIXED, head_dim=head_dim, group=group)

  @pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
  def test_ragged_block_sizes(self, block_size):
    bs = block_size
    self.check_ragged([(bs, bs), (1, 3 * bs + 5), (0, 0), (bs + 3, 2 * bs + 3)],
                      block_size=bs)

  @pytest.mark.parametrize("block_q,pages", [(4, 1), (16, 4)])
  def test_ragged_tiles(self, block_q, pages):
    self.check_ragged(self.MIXED, block_q=block_q, pages_per_compute_block=pages)

  @pytest.mark.parametrize("soft_cap,window", [(5.0, None), (None, 7), (2.0, 1)])
  def test_ragged_soft_cap_window(self, soft_cap, window):
    self.check_ragged(self.MIXED, soft_cap=soft_cap, sliding_window=window)

  @pytest.mark.parametrize("dtype,head_dim,group", [
      (jnp.bfloat16, 128, 8), (jnp.bfloat16, 64, 1), (jnp.float16, 128, 4)])
  def test_ragged_half(self, dtype, head_dim, group):
    self.check_ragged(self.MIXED, dtype=dtype, head_dim=head_dim, group=group)

  def test_ragged_non_power_of_two_group(self):
    # e.g. Qwen2.5-7B: 28 query heads over 4 KV heads.
    self.check_ragged(self.MIXED, group=7)
    self.check_decode([1, 37, 0, 16], group=7)

  def test_ragged_never_reads_unowned_slots(self):
    self.check_ragged(self.MIXED + [(3, 64)], poison=True)

  def test_ragged_only_padding(self):
    self.check_ragged([(0, 0), (0, 0)], pad_tokens=8)

  def test_ragged_long_prefill(self):
    # A 512-token chunk on top of 2,100 cached tokens, next to a decode token.
    self.check_ragged([(512, 2612), (1, 300), (0, 0)], dtype=jnp.bfloat16,
                      group=4, head_dim=64, pad_tokens=511)

  # -- argument checks ------------------------------------------------------

  def test_bad_shapes_raise(self):
    case = make_case(0, [(1, 5)], head_dim=64)
    q, k, v = case["q"][:1], case["k"], case["v"]
    bt, cl, qsl = case["block_tables"], case["context_lens"], case["query_start_loc"]
    with pytest.raises(ValueError, match="head_dim"):
      paged_decode_attention(q[..., :48], k[..., :48], v[..., :48], bt, cl, scale=1.0)
    with pytest.raises(ValueError, match="divisible"):
      paged_decode_attention(q[:, :7], k, v, bt, cl, scale=1.0)
    with pytest.raises(ValueError, match="must have q's dtype or float8_e4m3fn"):
      ragged_paged_attention(q.astype(jnp.bfloat16), k, v, bt, cl, qsl, scale=1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
      ragged_paged_attention(q, k, v, bt, cl, qsl[:1], scale=1.0)
    with pytest.raises(ValueError, match="block_q"):
      ragged_paged_attention(q, k, v, bt, cl, qsl, scale=1.0, block_q=3)
    with pytest.raises(ValueError, match="context_lens"):
      paged_decode_attention(q, k, v, bt, cl.astype(jnp.int64 if jax.config.x64_enabled
                                                    else jnp.int16), scale=1.0)


class TestKernelsInterpret(TestKernels):
  INTERPRET = True


def _run_gpu_class(platform_env):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(platform_env)
  return subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
       "-k", "TestKernels and not Interpret and test_decode_long"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
      capture_output=True, text=True, timeout=300)


def test_gpu_class_fails_when_gpu_asked_but_absent():
  if jax.default_backend() == "gpu":
    pytest.skip("checks the no-GPU path")
  proc = _run_gpu_class({"JPAGED_TEST_PLATFORM": "cuda"})
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  # The fixture fails the test (pytest counts a failed setup as an error).
  assert "asked to run on a GPU" in out and "1 error" in out, out[-3000:]
  # Without the request, the same test is skipped, not failed.
  proc = _run_gpu_class({})
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0 and "1 skipped" in out, out[-3000:]

"""Lowers every Pallas kernel configuration the engine can select for an H100, on CPU.

The Triton lowering of ``pl.pallas_call`` (Pallas jaxpr -> Triton IR) runs
when a jitted function is *lowered*, so lowering for ``cuda`` under an
abstract H100 catches Triton-side errors (non-power-of-two tensors, dots
that Triton rejects, unsupported primitives) without a GPU. The recipe works
on jax 0.10.2 and 0.11.2: an ``AbstractMesh`` carrying an
``AbstractDevice(platform="cuda")`` (0.11 reads the GPU generation from it)
plus ``lower(lowering_platforms=("cuda",))`` (0.10 needs the explicit
platform). The Triton module is also captured to check that every ``tt.dot``
is at least 16 x 16 x 16 and none runs at TF32 (float32 kernels must compute
IEEE f32 dots, Triton's default being TF32). What it cannot catch: the rest of Triton's own
compilation to PTX (shared memory or register limits, layout failures),
which XLA runs only when it compiles on a GPU.

Tested combinations: every block size (8..128) x GQA group (1, 4, 7, 8) x
head_dim (64, 128, 256) in bfloat16, each with a split and an unsplit decode;
float32 and float16 over the same block sizes, head dims and groups; soft-cap and sliding
window; a cache over 4 GiB (64-bit offsets); K/V loaded as flat tiles (what
lets Triton pipeline them; checked through the ``triton`` package's own sm_90
compile where that package is installed); and a self-check that a
non-power-of-two tile does fail to lower.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jpaged.pallas_kernels.attention import decode, ragged

# jax 0.11 warns on every Triton lowering; the migration is tracked elsewhere.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

H100 = "NVIDIA H100 80GB HBM3"
TRITON_CALL = "__gpu$xla.gpu.triton"
sds = jax.ShapeDtypeStruct


@contextlib.contextmanager
def capture_triton_modules():
  """Collects the text of every Triton module built while lowering."""
  from jax._src.pallas.triton import lowering as triton_lowering  # private
  modules = []
  original = triton_lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    modules.append(result.module.operation.get_asm())
    return result

  triton_lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield modules
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original


_DOT = re.compile(r"tt\.dot .*: tensor<(\d+)x(\d+)x\w+> \* tensor<(\d+)x(\d+)x\w+>")


def check_dots(module_text):
  """tl.dot needs M, N, K >= 16, which only Triton's PTX compile would check;
  and no dot may use TF32 (IEEE, the attribute's default, is not printed)."""
  assert "inputPrecision = tf32" not in module_text, "a kernel dot runs at TF32"
  dots = _DOT.findall(module_text)
  assert dots, "expected tt.dot in the kernel"
  for m, k, k2, n in dots:
    assert k == k2 and min(int(m), int(k), int(n)) >= 16, f"tt.dot {m}x{k} * {k2}x{n}"


def lower_for_h100(f, *args, modules_out=None):
  """``jax.jit(f)`` lowered for an abstract H100; returns the StableHLO text
  (and appends the Triton module's text to ``modules_out`` if given)."""
  device = jax.sharding.AbstractDevice(device_kind=H100, num_cores=None, platform="cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh), capture_triton_modules() as modules:
    lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
  assert len(modules) == 1, f"expected one Triton kernel, got {len(modules)}"
  check_dots(modules[0])
  if modules_out is not None:
    modules_out.extend(modules)
  return lowered.as_text()


def cache_args(num_blocks, block_size, num_kv_heads, head_dim, dtype):
  shape = (num_blocks, block_size, num_kv_heads, head_dim)
  return sds(shape, dtype), sds(shape, dtype)


def lower_decode(*, num_seqs, group, head_dim, block_size, dtype, num_kv_heads=8,
                 max_model_len=4000, num_blocks=1000, modules_out=None, **kw):
  max_blocks = -(-max_model_len // block_size)  # usually not a power of two
  args = (sds((num_seqs, num_kv_heads * group, head_dim), dtype),
          *cache_args(num_blocks, block_size, num_kv_heads, head_dim, dtype),
          sds((num_seqs, max_blocks), jnp.int32), sds((num_seqs,), jnp.int32))
  f = functools.partial(decode.paged_decode_attention, scale=head_dim ** -0.5, **kw)
  text = lower_for_h100(f, *args, modules_out=modules_out)
  assert TRITON_CALL in text
  return text


def lower_ragged(*, num_tokens, num_seqs, group, head_dim, block_size, dtype,
                 num_kv_heads=8, max_model_len=4000, num_blocks=1000, modules_out=None, **kw):
  max_blocks = -(-max_model_len // block_size)
  args = (sds((num_tokens, num_kv_heads * group, head_dim), dtype),
          *cache_args(num_blocks, block_size, num_kv_heads, head_dim, dtype),
          sds((num_seqs, max_blocks), jnp.int32), sds((num_seqs,), jnp.int32),
          sds((num_seqs + 1,), jnp.int32))
  f = functools.partial(ragged.ragged_paged_attention, scale=head_dim ** -0.5, **kw)
  text = lower_for_h100(f, *args, modules_out=modules_out)
  assert TRITON_CALL in text
  return text


BLOCK_SIZES = [8, 16, 32, 64, 128]
GROUPS = [1, 4, 7, 8]
HEAD_DIMS = [64, 128, 256]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("group", GROUPS)
def test_lower_bf16_all_block_sizes(block_size, group):
  for head_dim in HEAD_DIMS:
    # batch 1 picks split-K, batch 256 does not; both kernels' variants.
    for num_seqs in (1, 256):
      assert decode.default_decode_params(num_seqs, 8, block_size, 4000 // block_size + 1)
      lower_decode(num_seqs=num_seqs, group=group, head_dim=head_dim,
                   block_size=block_size, dtype=jnp.bfloat16)
    lower_ragged(num_tokens=512, num_seqs=256, group=group, head_dim=head_dim,
                 block_size=block_size, dtype=jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("group", GROUPS)
def test_lower_other_dtypes(dtype, group):
  for head_dim in HEAD_DIMS:
    for block_size in BLOCK_SIZES:
      lower_decode(num_seqs=4, group=group, head_dim=head_dim,
                   block_size=block_size, dtype=dtype)
      lower_ragged(num_tokens=64, num_seqs=4, group=group, head_dim=head_dim,
                   block_size=block_size, dtype=dtype)


@pytest.mark.parametrize("soft_cap,window", [(30.0, None), (None, 1024), (50.0, 4096)])
def test_lower_soft_cap_window(soft_cap, window):
  for num_seqs in (1, 64):
    lower_decode(num_seqs=num_seqs, group=4, head_dim=128, block_size=16,
                 dtype=jnp.bfloat16, soft_cap=soft_cap, sliding_window=window)
  lower_ragged(num_tokens=2048, num_seqs=64, group=4, head_dim=128, block_size=16,
               dtype=jnp.bfloat16, soft_cap=soft_cap, sliding_window=window)


def test_lower_bucket_shapes():
  # The engine's token buckets and max_num_seqs = min(T, 256).
  for num_tokens in (1, 2, 16, 128, 1024, 8192):
    lower_ragged(num_tokens=num_tokens, num_seqs=min(num_tokens, 256), group=4,
                 head_dim=128, block_size=16, dtype=jnp.bfloat16)
  for num_seqs in (1, 3, 8, 100, 256):
    lower_decode(num_seqs=num_seqs, group=4, head_dim=128, block_size=16,
                 dtype=jnp.bfloat16, max_model_len=131072)


def test_lower_cache_over_4gib():
  # Offsets switch to 64 bits when the cache is larger than 2**32 bytes.
  text = lower_decode(num_seqs=8, group=4, head_dim=128, block_size=16,
                      dtype=jnp.bfloat16, num_blocks=300_000)
  assert TRITON_CALL in text
  lower_ragged(num_tokens=256, num_seqs=8, group=4, head_dim=128, block_size=16,
               dtype=jnp.bfloat16, num_blocks=300_000)


_LOAD = re.compile(r"tt\.load [^:]*: tensor<([0-9x]+)x!tt\.ptr<(\w+)>>")


@pytest.mark.parametrize("kernel", ["decode", "ragged"])
@pytest.mark.parametrize("block_size,pages", [(16, 8), (16, 1), (8, 4), (64, 2)])
def test_kv_tiles_load_flat(kernel, block_size, pages):
  """K and V load as ``[keys, head_dim]`` tiles, never as ``[pages, page, dim]``
  reshaped afterwards: Triton then keeps the V tile in registers and only one
  K buffer (seen compiling for sm_90), which starves the memory pipeline."""
  modules = []
  geometry = dict(group=4, head_dim=128, block_size=block_size, dtype=jnp.bfloat16,
                  pages_per_compute_block=pages, modules_out=modules)
  if kernel == "decode":
    lower_decode(num_seqs=64, **geometry)
  else:
    lower_ragged(num_tokens=512, num_seqs=64, **geometry)
  tiles = [shape for shape, ty in _LOAD.findall(modules[0]) if ty == "bf16"]
  keys = f"{pages * block_size}x128"
  assert tiles.count(keys) >= 2, (keys, tiles)  # K and V
  assert f"{pages}x{block_size}x128" not in tiles, tiles


def test_lowering_catches_non_power_of_two_tiles():
  """Self-check: the harness really runs the Triton lowering.

  Bypasses the public ValueErrors to build a decode kernel whose page tile
  has 3 pages, a non-power-of-two tensor that Triton rejects.
  """
  def bad(q, k, v, bt, cl):
    return decode._decode_call(
        q, k, v, bt, cl, scale=1.0, soft_cap=None, sliding_window=None,
        pages_per_block=3, num_splits=1, num_warps=4, num_stages=2, interpret=False)

  args = (sds((4, 32, 128), jnp.bfloat16), *cache_args(100, 16, 8, 128, jnp.bfloat16),
          sds((4, 30), jnp.int32), sds((4,), jnp.int32))
  with pytest.raises(Exception, match="power of 2"):
    lower_for_h100(bad, *args)


def test_triton_pipelines_flat_kv_tiles():
  """Where the ``triton`` package is installed (not a jpaged dependency), its
  sm_90 compile of the decode kernel's default config (8 pages of 16, 3
  stages) streams K and V through two async-copy buffers each, fits in an
  H100 block's 227 KiB of shared memory, and leaves no tile load in
  registers."""
  pytest.importorskip("triton")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "scripts/gpu_triton_report.py", "--pages", "8", "--stages", "3"],
      cwd=root, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", TRITON_DEFAULT_FP_FUSION="1"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  m = re.search(r"shared (\d+) KiB; (\d+) async copies in the loop, buffers (\d+); "
                r"(\d+) plain 2-D tile loads", proc.stdout)
  assert m, proc.stdout
  shared, copies, buffers, plain = map(int, m.groups())
  assert shared <= 227 and copies == 2 and buffers == 2 and plain == 0, proc.stdout

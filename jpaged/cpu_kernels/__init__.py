"""Native CPU kernels, called from jitted code through the XLA FFI.

Four places where XLA:CPU leaves much of the machine unused (measured in
BENCHMARKS.md):

* paged attention (``paged_attention.cc``): XLA copies every context chunk
  out of the cache (gathers and transposes) before multiplying it; the kernel
  reads each cache block in place;
* matrix products with a few rows (``matmul.cc``): a decode step's
  ``[M, in] x [out, in]^T`` for small M runs at about half the arithmetic
  rate XLA reaches with many rows; the kernel keeps a tile of rows x weight
  rows in registers, and up to `MATMUL_MAX_ROWS` rows it is the faster;
* the Llama MLP (``matmul.cc``'s ``Mlp``): XLA writes the gate/up product
  out, reads it back for ``silu(gate) * up`` and transposes it again for the
  down projection; the kernel applies silu * up in registers and leaves h in
  the layout the down projection's tiles read (9 to `MLP_MAX_ROWS` rows);
* greedy sampling's row-wise argmax over the vocabulary (``argmax.cc``): XLA
  reduces (value, index) pairs one element at a time.

Beside the kernels, `keep_freed_memory` tunes glibc's malloc so that the
buffers XLA:CPU allocates and frees on every step are not page-faulted in
afresh each time.

They are compiled on first use with the system's C++ compiler (``g++`` or
``$CXX``, ``-O3 -march=native``) into ``$JPAGED_KERNEL_CACHE`` (default
``~/.cache/jpaged/kernels``), keyed by the sources, the JAX version and the CPU, then
registered with ``jax.ffi``; later processes load the built library.

``JPAGED_CPU_KERNELS`` picks: ``auto`` (the default: the native kernels when
they build, else XLA, with a warning), ``native`` (an error if they cannot be
built or do not apply) or ``xla``.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

TARGET = "jpaged_cpu_paged_attention"
MATMUL_TARGET = "jpaged_cpu_matmul_nt"
MLP_TARGET = "jpaged_cpu_mlp"
ARGMAX_TARGET = "jpaged_cpu_argmax_rows"
HEAD_DIMS = (64, 128)  # compiled specializations
# Rows up to which the native product runs. scripts/bench_cpu_matmul.py
# --native (SmolLM2's MLP shapes): 2.2x XLA's speed at 2 and 8 rows, 2.0x at
# 16, 1.85x at 32, 1.4x at 64, 1.1x at 96, 1.2x at 128 and 256; with --llama
# (the ~32M Llama's layers): 1.9x at 32, 1.3x at 64, 1.2x at 96, 1.1x at 128
# and 256, 1.0x at 512. Yet in the model XLA's dot fuses its neighbours: the
# prefill workload of scripts/bench_throughput.py (512-row steps) took 20.4
# and 20.5 s with this limit and 21.0 and 21.2 s with 512. One row is a
# matrix-vector product XLA already runs at the memory bandwidth.
MATMUL_MAX_ROWS = 96
_DIR = os.path.dirname(__file__)
_SOURCES = [os.path.join(_DIR, f) for f in ("paged_attention.cc", "matmul.cc", "argmax.cc")]
_HEADERS = [os.path.join(_DIR, "parallel.h")]
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-w"]
_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or "error": why it is unavailable; "malloc"


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Allocations up to this size come from malloc's heap instead of fresh mmaps.
MALLOC_MMAP_THRESHOLD = 64 << 20
MALLOC_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory XLA:CPU frees, for the next step.

    XLA:CPU allocates a step's temporary buffers on every run and frees them
    after it. By default glibc serves allocations of more than a few MiB
    with fresh ``mmap`` s and returns freed ones to the kernel, so every
    step faults all its temporary pages in again, zeroed: about 5,100 page
    faults (20 MiB) a 512-token step on scripts/bench_throughput.py's Llama,
    about 2.3 us each on this VM, so 148 -> 142 ms a step once they are
    gone. vLLM's CPU build gets the same from tcmalloc (``LD_PRELOAD``).
    The cost is that the process keeps its peak heap instead of returning
    it. Set once per process; ``JPAGED_CPU_MALLOC=default`` leaves malloc
    alone. Returns whether it applied (glibc only)."""
    if os.environ.get("JPAGED_CPU_MALLOC", "keep") == "default":
        return False
    with _lock:
        if "malloc" in _state:
            return _state["malloc"]
        ok = False
        try:
            libc = ctypes.CDLL(None)
            mallopt = getattr(libc, "mallopt", None)
            if mallopt is not None and platform.libc_ver()[0] == "glibc":
                ok = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
                    mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
        except OSError:
            ok = False
        _state["malloc"] = ok
        return ok


def mode() -> str:
    m = os.environ.get("JPAGED_CPU_KERNELS", "auto")
    if m not in ("auto", "native", "xla"):
        raise ValueError(f"JPAGED_CPU_KERNELS={m!r}: expected auto, native or xla")
    return m


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def library_path() -> str:
    src = b""
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            src += f.read()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + jax.__version__.encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    root = os.environ.get("JPAGED_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "jpaged", "kernels")
    return os.path.join(root, f"libjpaged_cpu_{key}.so")


def _build(path: str) -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++, c++ or $CXX) to build the CPU kernels")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Built beside the target, then renamed: concurrent builders never see a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", *_SOURCES, "-o", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as e:
            raise RuntimeError(f"cannot run the C++ compiler {cxx!r}: {e}") from e
        if res.returncode:
            raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):\n"
                               f"{res.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load():
    """The registered native library, building it if needed; None (with the
    reason in `unavailable_reason`) where it cannot be built."""
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")
        try:
            path = library_path()
            if not os.path.exists(path):
                logger.info("building the native CPU kernels into %s", path)
                _build(path)
            lib = ctypes.CDLL(path)
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JpagedCpuPagedAttention),
                                        platform="cpu")
            jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(lib.JpagedCpuMatmulNT),
                                        platform="cpu")
            jax.ffi.register_ffi_target(MLP_TARGET, jax.ffi.pycapsule(lib.JpagedCpuMlp),
                                        platform="cpu")
            jax.ffi.register_ffi_target(ARGMAX_TARGET, jax.ffi.pycapsule(lib.JpagedCpuArgmaxRows),
                                        platform="cpu")
            _state["lib"] = lib
        except (OSError, RuntimeError, AttributeError) as e:
            _state["error"] = str(e)
            if mode() == "native":
                raise
            logger.warning("native CPU kernels unavailable, using XLA's: %s", e)
        return _state.get("lib")


def unavailable_reason() -> str | None:
    return _state.get("error")


def use_native_attention(q_dtype, cache_dtype) -> bool:
    """Whether CPU attention of ``q_dtype`` queries over a ``cache_dtype`` cache
    runs the native kernel (float32 or bfloat16, the same for both; an fp8
    cache stays on XLA's path)."""
    m = mode()
    supported = jnp.dtype(q_dtype) == jnp.dtype(cache_dtype) and jnp.dtype(q_dtype) in (
        jnp.float32, jnp.bfloat16)
    if m == "xla":
        return False
    if not supported:
        if m == "native":
            raise ValueError(f"JPAGED_CPU_KERNELS=native: the attention kernel takes float32 or "
                             f"bfloat16 queries and caches of one dtype, not "
                             f"{jnp.dtype(q_dtype)} over {jnp.dtype(cache_dtype)}")
        return False
    return load() is not None


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, *,
                    scale: float, sliding_window: int | None = None):
    """The reference contract (`ragged_paged_attention_reference`) on the native
    kernel. q: [T, H, D]; caches [num_blocks, block_size, KVH, D] of q's dtype."""
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"native CPU attention: q is {q.dtype}, the caches "
                         f"{k_cache.dtype}/{v_cache.dtype}; they must match")
    if load() is None:
        raise RuntimeError(f"native CPU attention unavailable: {unavailable_reason()}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(q, k_cache, v_cache,
                block_tables.astype(jnp.int32), context_lens.astype(jnp.int32),
                query_start_loc.astype(jnp.int32), scale=np.float32(scale),
                sliding_window=np.int64(sliding_window or 0))


# Set while tracing a step on one device: a custom call cannot be partitioned,
# so under tensor parallelism the products stay with XLA.
_single_device = contextvars.ContextVar("jpaged_cpu_single_device", default=False)


@contextlib.contextmanager
def single_device():
    """Trace the enclosed model code for one device: the native matmul may apply."""
    token = _single_device.set(True)
    try:
        yield
    finally:
        _single_device.reset(token)


def native_matmul_applies(x, w) -> bool:
    """Whether ``x @ w.T`` (x ``[M, in]``, w ``[out, in]``) runs the native
    product: on XLA:CPU inside `single_device`, float32, 2 <= M <=
    `MATMUL_MAX_ROWS`, ``out`` a multiple of 4."""
    if (not _single_device.get() or jax.default_backend() != "cpu" or mode() == "xla"
            or x.ndim != 2 or w.ndim != 2 or not 2 <= x.shape[0] <= MATMUL_MAX_ROWS
            or x.dtype != jnp.float32 or w.dtype != jnp.float32 or w.shape[0] % 4):
        return False
    return load() is not None


def matmul_nt(x, w):
    """``x @ w.T`` for float32 x ``[M, K]`` and w ``[N, K]`` (N a multiple of 4)."""
    if load() is None:
        raise RuntimeError(f"native CPU kernels unavailable: {unavailable_reason()}")
    return jax.ffi.ffi_call(MATMUL_TARGET,
                            jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32))(x, w)


# Rows from which, up to which, the fused MLP runs (below it, the product's
# dot-product tiling does; see matmul.cc). scripts/bench_cpu_matmul.py --mlp
# --llama, the fused MLP's speed against XLA's products: 2.2x at 16 rows,
# 1.8x at 32, 1.4x at 64, 1.3x at 96, 1.2x at 128 and 256, 1.08x at 512
# (212 GFLOP/s, 91% of the FMA peak); the native products alone are 0.96x at
# 512. Not measured past 512, the largest CPU step bucket of the benchmarks.
MLP_MIN_ROWS = 9
MLP_MAX_ROWS = 512


def native_mlp_applies(x, gate_up, down) -> bool:
    """Whether the fused MLP ``(silu(x @ gate.T) * (x @ up.T)) @ down.T`` runs
    natively: as `native_matmul_applies`, float32 x ``[M, K]`` with
    `MLP_MIN_ROWS` <= M <= `MLP_MAX_ROWS`, gate_up ``[2I, K]`` (gate rows, then
    up rows) and down ``[N, I]``, I and N multiples of 4."""
    if (not _single_device.get() or jax.default_backend() != "cpu" or mode() == "xla"
            or x.ndim != 2 or gate_up.ndim != 2 or down.ndim != 2
            or not MLP_MIN_ROWS <= x.shape[0] <= MLP_MAX_ROWS
            or any(a.dtype != jnp.float32 for a in (x, gate_up, down))):
        return False
    i2, k = gate_up.shape
    if k != x.shape[1] or i2 % 8 or down.shape[1] != i2 // 2 or down.shape[0] % 4:
        return False
    return load() is not None


def mlp(x, gate_up, down):
    """``(silu(x @ gate.T) * (x @ up.T)) @ down.T`` for float32 x ``[M, K]``,
    gate_up ``[2I, K]`` (gate rows, then up rows) and down ``[N, I]``."""
    if load() is None:
        raise RuntimeError(f"native CPU kernels unavailable: {unavailable_reason()}")
    return jax.ffi.ffi_call(MLP_TARGET,
                            jax.ShapeDtypeStruct((x.shape[0], down.shape[0]), jnp.float32))(
                                x, gate_up, down)


def native_argmax_applies(x) -> bool:
    """Whether the row-wise argmax of ``x`` (float32 ``[S, V]``) runs the native
    kernel: on XLA:CPU inside `single_device`."""
    if (not _single_device.get() or jax.default_backend() != "cpu" or mode() == "xla"
            or x.ndim != 2 or x.dtype != jnp.float32 or x.shape[1] == 0):
        return False
    return load() is not None


def argmax_rows(x):
    """``jnp.argmax(x, axis=-1)`` (int32) for float32 ``x [S, V]``: the first
    maximum of each row, or its first NaN."""
    if load() is None:
        raise RuntimeError(f"native CPU kernels unavailable: {unavailable_reason()}")
    return jax.ffi.ffi_call(ARGMAX_TARGET, jax.ShapeDtypeStruct((x.shape[0],), jnp.int32))(x)

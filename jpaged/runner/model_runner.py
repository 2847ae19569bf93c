"""ModelRunner: turns a `SchedulerOutput` into one jitted device step.

Device state owned here (all pytrees, rebound after every call because the
step donates them):

* ``kv_caches``: per layer ``(k, v)``, each ``[num_blocks, block_size,
  num_kv_heads, head_dim]`` (the layout every attention backend reads);
* ``block_table``: ``[max_num_seqs, max_blocks_per_seq]`` int32, one row per
  persistent-batch row; each step applies only the entries that changed;
* ``token_table``: ``[max_num_seqs, max_model_len]`` int32 token history per
  row, written by each step's own input tokens (penalties read it);
* ``last_tokens``: ``[max_num_seqs]`` int32, each row's last sampled token,
  which the next step substitutes for its -1 input ids (async scheduling:
  the host has not read that token yet when it builds the next step).

`dispatch` packs the step (`InputBatch.build`), launches it and starts the
copy of its sampled tokens to the host without waiting; `StepHandle.results`
reads them later. Steps are padded to a token bucket (``S = min(T,
max_num_seqs)`` sample rows); `warmup` compiles every bucket (two with the
Pallas backend: decode-only and mixed) and ``num_compiles`` must not move
afterwards. ``warmup(background=True)`` compiles only the smallest and the
largest bucket before returning and the others on a background thread:
meanwhile a step pads to the smallest *compiled* bucket that holds it
(``ready_buckets``), so serving starts sooner and never waits on a compile.

Under tensor parallelism the runner holds the mesh: the KV cache is split by
KV heads (one copy of a KV head per device when there are fewer heads than
devices), the block table, token table, ``last_tokens`` and the packed buffer
are replicated, so block ids mean the same on every device and the host's
allocator is unchanged; the step's logits are gathered before sampling, so
every device samples the same tokens.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jpaged import cpu_kernels
from jpaged.cache.kv_cache_manager import cdiv
from jpaged.config.model import ModelConfig
from jpaged.distributed.mesh import make_mesh
from jpaged.distributed.sharding import (
    kv_cache_heads, kv_cache_spec, logits_spec, param_shardings, replicated)
from jpaged.layers.attention import AttentionMetadata, rows_needed, select_rows
from jpaged.layers.kv_quant import FP8, resolve_kv_cache_dtype
from jpaged.models.bart import hide_encoder_tokens
from jpaged.runner.buckets import bucket_for, token_buckets
from jpaged.runner.input_batch import MAX_BANNED, BuiltStep, InputBatch
from jpaged.runner.step_inputs import StepLayout
from jpaged.sample.beam_search import MAX_BEAM_CANDIDATES
from jpaged.sample.prompt_logprobs import score_prompt
from jpaged.sample.sampler import beam_candidates, sample
from jpaged.sched.output import SchedulerOutput

logger = logging.getLogger(__name__)

FEW_LOGIT_ROWS = 32  # see ModelRunner._logits


def kv_cache_dtype(cfg: ModelConfig, backend: str, kv_dtype: str = "auto"):
    """The KV cache's dtype: float8 e4m3 for ``kv_dtype`` fp8_e4m3 (or its
    alias fp8); else the model's, except bfloat16 on XLA:CPU, whose
    scatter into a bfloat16 buffer copies the whole buffer (measured: 75 ms a
    step for a 64 MiB cache, against 0.01 ms for float16 or float32), so
    there the cache is float32."""
    if resolve_kv_cache_dtype(kv_dtype) == "fp8_e4m3":
        return FP8
    if cfg.jnp_dtype == jnp.bfloat16 and backend == "reference" and (
            jax.default_backend() == "cpu"):
        return jnp.float32
    return cfg.jnp_dtype


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, backend: str, tp: int = 1,
                       kv_dtype: str = "auto") -> int:
    """Bytes of one KV block on one device, with the cache split over ``tp``."""
    heads = kv_cache_heads(cfg.num_key_value_heads, tp) // tp
    return (2 * cfg.num_hidden_layers * block_size * heads * cfg.head_dim
            * jnp.dtype(kv_cache_dtype(cfg, backend, kv_dtype)).itemsize)


@dataclass(frozen=True)
class RunnerConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    backend: str  # resolved: "reference" | "pallas"
    max_logprobs: int = 20
    num_host_blocks: int = 0
    logits_processors: tuple = ()  # jpaged.sample.logits_processors, checked
    kv_cache_dtype: str = "auto"  # or fp8_e4m3 (jpaged.layers.kv_quant)
    kv_scales: tuple = ()  # fp8: per layer (k_scale, v_scale); () means 1.0


class StepHandle:
    """A dispatched step: its sampled tokens are on their way to the host."""

    def prompt_logprobs(self):
        """``(target logprob [T], rank [T], top ids [T, K], top logprobs [T,
        K])`` of a step with prompt logprobs (`jpaged.sample.prompt_logprobs`)."""
        return tuple(np.asarray(a) for a in self._arrays[7:])

    def __init__(self, out: SchedulerOutput, built: BuiltStep | None, arrays):
        self.out, self.built, self._arrays = out, built, arrays
        for a in arrays:
            a.copy_to_host_async()

    def results(self):
        """``(tokens, logprob, rank, top_ids, top_logprobs, sample_offsets,
        beam_ids, beam_logprobs)``: numpy arrays over sample rows (blocks until
        the step is done); the last two are beam rows' best next tokens."""
        tokens, lp, rank, top_ids, top_lps, beam_ids, beam_lps = (
            np.asarray(a) for a in self._arrays[:7])
        return (tokens, lp, rank, top_ids, top_lps, self.built.sample_offsets, beam_ids,
                beam_lps)


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, graphdef, params, cfg: RunnerConfig,
                 eos_token_ids=(), mesh=None):
        self.model_cfg, self.graphdef, self.params, self.cfg = model_cfg, graphdef, params, cfg
        if jax.default_backend() == "cpu":
            cpu_kernels.keep_freed_memory()  # no page faults on each step's buffers
        self.eos_token_ids = set(eos_token_ids)
        self.max_blocks_per_seq = cdiv(cfg.max_model_len, cfg.block_size)
        self.mesh = mesh = mesh if mesh is not None else make_mesh(1)
        self._rep = rep = replicated(mesh)
        heads = kv_cache_heads(model_cfg.num_key_value_heads, mesh.size)
        shape = (cfg.num_blocks, cfg.block_size, heads, model_cfg.head_dim)
        dt = kv_cache_dtype(model_cfg, cfg.backend, cfg.kv_cache_dtype)
        kv_sh = NamedSharding(mesh, kv_cache_spec())
        self._kv_sh = [(kv_sh, kv_sh)] * model_cfg.num_hidden_layers
        # Allocated in place, shard by shard: no device holds the whole cache.
        self.kv_caches = jax.jit(lambda: [(jnp.zeros(shape, dt), jnp.zeros(shape, dt))
                                          for _ in range(model_cfg.num_hidden_layers)],
                                 out_shardings=self._kv_sh)()
        r = cfg.max_num_seqs
        self.batch = InputBatch(r, cfg.max_model_len, self.max_blocks_per_seq, cfg.block_size,
                                cfg.num_blocks, model_cfg.vocab_size, cfg.logits_processors,
                                model_cfg.is_encoder_decoder)
        self.block_table = self._put(np.zeros((r, self.max_blocks_per_seq), np.int32))
        self.token_table = self._put(np.zeros((r, cfg.max_model_len), np.int32))
        self.last_tokens = self._put(np.zeros((r,), np.int32))
        host_shape = (cfg.num_host_blocks,) + shape[1:]
        self.host_kv = [(np.zeros(host_shape, dt), np.zeros(host_shape, dt))
                        for _ in range(model_cfg.num_hidden_layers)] if cfg.num_host_blocks else []
        self.buckets = token_buckets(cfg.max_num_batched_tokens,
                                     cpu=cfg.backend == "reference")
        self.num_compiles = 0
        self._compiled: dict = {}  # (layout, decode_only) -> the executable warm-up built
        # Buckets a step may use: all of them (compiled on first use) unless a
        # background warm-up is still compiling some.
        self.ready_buckets = list(self.buckets)
        self.warmup_done = threading.Event()
        self.warmup_done.set()
        self.compiles_pending = 0  # background warm-up compiles not done yet
        self._last: tuple | None = None  # (buf, layout, decode_only) of the last step
        # Explicit shardings in and out: donated buffers keep their layout, and
        # an output's layout never changes the next call's compile key.
        p_sh = param_shardings(params, mesh)
        self._step = jax.jit(self._step_impl, donate_argnums=(1, 2, 3, 4),
                             static_argnums=(6, 7),
                             in_shardings=(p_sh, self._kv_sh, rep, rep, rep, rep),
                             out_shardings=(self._kv_sh, rep, rep, rep, rep))
        self._gather_blocks = jax.jit(self._gather_impl, in_shardings=(self._kv_sh, rep),
                                      out_shardings=self._kv_sh)
        self._scatter_blocks = jax.jit(self._scatter_impl, donate_argnums=(0,),
                                       in_shardings=(self._kv_sh, rep, self._kv_sh),
                                       out_shardings=self._kv_sh)
        self._set_token_row = jax.jit(self._set_row_impl, donate_argnums=(0,),
                                      in_shardings=(rep, rep, rep), out_shardings=rep)

    def _put(self, x: np.ndarray):
        """A host array, replicated on every device of the mesh."""
        return jax.device_put(x, self._rep)

    # ----------------------------------------------------------- the step
    def _step_impl(self, params, kv_caches, block_table, token_table, last_tokens, buf,
                   layout: StepLayout, decode_only: bool = False):
        self.num_compiles += 1  # runs at trace time only
        # On one device the native CPU kernels may stand in for XLA's products.
        with (cpu_kernels.single_device() if self.mesh.size == 1 else contextlib.nullcontext()):
            return self._step_body(params, kv_caches, block_table, token_table, last_tokens,
                                   buf, layout, decode_only)

    def _step_body(self, params, kv_caches, block_table, token_table, last_tokens, buf,
                   layout: StepLayout, decode_only: bool):
        logger.info("compiling step: %d tokens, %d sequences%s", layout.num_tokens,
                    layout.num_seqs, " (decode-only)" if decode_only else "")
        inp = layout.unpack(buf)
        block_table = block_table.at[inp.upd_rows, inp.upd_cols].set(inp.upd_vals, mode="drop")
        rows = jnp.minimum(inp.token_rows, last_tokens.shape[0] - 1)
        input_ids = jnp.where(inp.input_ids < 0, last_tokens[rows], inp.input_ids)
        history = input_ids
        if inp.encoder_lens is not None:  # encoder-decoder: penalties see decoder tokens
            history = hide_encoder_tokens(input_ids, inp.positions, inp.encoder_lens,
                                          inp.query_start_loc, inp.context_lens,
                                          self.cfg.block_size, self.model_cfg.vocab_size)
        token_table = token_table.at[inp.token_rows, inp.positions].set(history, mode="drop")
        # Copy-on-write: duplicate shared blocks before anything writes them.
        # Copies come first in copy_dst, padding (num_blocks) after: most
        # steps have none and skip the gathers (measured on SmolLM2 on a CPU:
        # 60 gathers of padding blocks took 7 ms of a 112 ms decode step).
        src, dst = inp.copy_src, inp.copy_dst
        kv_caches = jax.lax.cond(
            dst[0] < self.cfg.num_blocks,
            lambda kv: [(k.at[dst].set(k[src], mode="drop"), v.at[dst].set(v[src], mode="drop"))
                        for k, v in kv],
            lambda kv: kv, kv_caches)
        md = AttentionMetadata(
            slot_mapping=inp.slot_mapping, block_tables=block_table[inp.seq_rows],
            context_lens=inp.context_lens, query_start_loc=inp.query_start_loc,
            backend=self.cfg.backend, decode_only=decode_only,
            mesh=self.mesh if self.mesh.size > 1 else None, kv_scales=self.cfg.kv_scales)
        model = nnx.merge(self.graphdef, params)
        # Encoder-decoder models also take each sequence's encoder length.
        extra = {} if inp.encoder_lens is None else {"encoder_lens": inp.encoder_lens}
        if self._selects_rows(model, layout):
            extra["select"] = select_rows(md, inp.logits_indices, inp.positions,
                                          inp.sampling.token_rows < self.cfg.max_num_seqs,
                                          few=FEW_LOGIT_ROWS)
        hidden, kv_caches = model(input_ids, inp.positions, kv_caches, md, **extra)
        # With a selection the model returns the sample rows' hidden states.
        rows = hidden if "select" in extra else hidden[inp.logits_indices]
        logits = self._logits(model, rows, inp.sampling.token_rows)
        # Split by vocabulary under TP (so the lm_head never moves), then
        # gathered once, so sampling sees the whole vocabulary.
        logits = jax.lax.with_sharding_constraint(
            logits, NamedSharding(self.mesh, logits_spec()))
        logits = jax.lax.with_sharding_constraint(logits, self._rep)
        results = sample(logits, inp.sampling, token_table, self.cfg.max_logprobs,
                         self.cfg.logits_processors, inp.processors)
        results += beam_candidates(logits, inp.sampling, token_table,
                                   min(MAX_BEAM_CANDIDATES, logits.shape[-1]),
                                   self.cfg.logits_processors, inp.processors)
        last_tokens = last_tokens.at[inp.sampling.token_rows].set(results[0], mode="drop")
        if layout.prompt_logprobs:  # every token's logits, scored against the prompt
            results += score_prompt(
                lambda h: jax.lax.with_sharding_constraint(model.compute_logits(h), self._rep),
                hidden, inp.plp_targets, max(1, self.cfg.max_logprobs))
        return kv_caches, block_table, token_table, last_tokens, results

    def _selects_rows(self, model, layout: StepLayout) -> bool:
        """Whether the step's last layer runs on the sample rows only
        (`jpaged.layers.attention.RowSelection`): there are fewer of them
        than tokens, no request asks for every token's logits (prompt
        logprobs), the model supports it, and the attention is the reference
        backend's (whose contract makes rows without context zeros). On the
        ~32M Llama on a CPU, a 512-token prefill step: see BENCHMARKS.md."""
        return (layout.num_seqs < layout.num_tokens and not layout.prompt_logprobs
                and self.cfg.backend == "reference"
                and getattr(model, "supports_row_selection", False))

    def _logits(self, model, h, token_rows):
        """The sample rows' logits [S, V]. A step pads its sample rows to S
        (128 for a 512-token bucket) but a prefill step samples a few: when
        the rows that sample all lie in the first `FEW_LOGIT_ROWS`, only those
        are multiplied by the lm_head and the rest are zeros (their tokens
        are dropped). Measured on the ~32M Llama (vocabulary 8192) on a CPU:
        the 512-token step's lm_head 6.6 -> 2 ms."""
        s = h.shape[0]
        if self.mesh.size > 1 or s <= FEW_LOGIT_ROWS:
            return model.compute_logits(h)
        needed = rows_needed(token_rows < self.cfg.max_num_seqs)

        def few(h):
            out = model.compute_logits(h[:FEW_LOGIT_ROWS])
            return jnp.pad(out, ((0, s - FEW_LOGIT_ROWS), (0, 0)))

        return jax.lax.cond(needed <= FEW_LOGIT_ROWS, few, model.compute_logits, h)

    def _run(self, buf, layout: StepLayout, decode_only: bool):
        if isinstance(buf, np.ndarray):
            buf = self._put(buf)
        args = (self.params, self.kv_caches, self.block_table, self.token_table,
                self.last_tokens, buf)
        compiled = self._compiled.get((layout, decode_only))
        (self.kv_caches, self.block_table, self.token_table, self.last_tokens,
         res) = compiled(*args) if compiled is not None else self._step(*args, layout,
                                                                        decode_only)
        return res

    def _gather_impl(self, kv, ids):  # swap out: [n] block ids -> per layer [n, ...]
        self.num_compiles += 1
        return [(k[ids], v[ids]) for k, v in kv]

    def _scatter_impl(self, kv, ids, data):  # swap in
        self.num_compiles += 1
        return [(k.at[ids].set(dk, mode="drop"), v.at[ids].set(dv, mode="drop"))
                for (k, v), (dk, dv) in zip(kv, data)]

    @staticmethod
    def _set_row_impl(table, row, values):
        return table.at[row].set(values)

    # ------------------------------------------------------------ warm-up
    def _variants(self):
        """(bucket, decode_only) pairs the engine can pick."""
        variants = [False, True] if self.cfg.backend == "pallas" else [False]
        for prev, t in zip([0] + self.buckets, self.buckets):
            for decode_only in variants:
                if decode_only and prev >= self.cfg.max_num_seqs:
                    continue  # no decode step of <= max_num_seqs tokens lands here
                yield t, decode_only

    def _empty_layout(self, t: int) -> StepLayout:
        s = min(t, self.cfg.max_num_seqs)
        return StepLayout(t, s, t + s, s, MAX_BANNED, self.cfg.logits_processors,
                          encoder_decoder=self.model_cfg.is_encoder_decoder)

    def _empty_buf(self, layout: StepLayout) -> np.ndarray:
        """A step that computes nothing: every token and update is padding."""
        buf = np.zeros(layout.size, np.int32)
        v = layout.views(buf)
        r, nb = self.cfg.max_num_seqs, self.cfg.num_blocks
        v["slot_mapping"][:] = nb * self.cfg.block_size
        v["token_rows"][:] = r
        v["upd_rows"][:] = r
        v["copy_dst"][:] = nb
        v["top_p"][:] = 1
        v["repetition_penalty"][:] = 1
        v["sample_token_rows"][:] = r
        v["banned"][:] = self.model_cfg.vocab_size
        return buf

    def _step_avals(self):
        """The step's array arguments as shape/dtype/sharding structs (for
        lowering off the main thread, where live arrays may be donated away)."""
        def aval(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        return jax.tree.map(aval, (self.params, self.kv_caches, self.block_table,
                                   self.token_table, self.last_tokens))

    def _lower(self, avals, t: int, decode_only: bool):
        layout = self._empty_layout(t)
        buf = self._put(self._empty_buf(layout))
        return layout, self._step.lower(*avals, buf, layout, decode_only)

    def warmup(self, background: bool = False) -> None:
        """Compile the buckets now (and the swap and token-row helpers), so
        that serving never compiles.

        Every bucket is traced here, then compiled by a pool of threads, one
        per CPU core (XLA compiles one program on one core and releases the
        GIL while it does).

        ``background``: compile only the smallest and the largest bucket here
        (every step fits the largest) and the rest on one background thread,
        smallest first, leaving the other cores to serving; each becomes
        usable (`ready_buckets`) when compiled; `warmup_done` is set at the end.
        """
        start = time.perf_counter()
        variants = list(self._variants())
        now = variants
        if background and len(self.buckets) > 2:
            ends = (self.buckets[0], self.buckets[-1])
            now = [v for v in variants if v[0] in ends]
            self.ready_buckets = list(ends)
        avals = self._step_avals()
        # Trace every bucket first, then compile them on the pool: a trace
        # runs small eager ops (which compile and load code) and once crashed
        # XLA:CPU while a worker loaded an executable from the disk cache.
        lowered = [(t, decode_only, *self._lower(avals, t, decode_only))
                   for t, decode_only in now]
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            jobs = [(t, layout, decode_only, pool.submit(low.compile))
                    for t, decode_only, layout, low in lowered]
            for t, layout, decode_only, job in jobs:
                self._compiled[(layout, decode_only)] = job.result()
                logger.info("warm-up: bucket of %d tokens%s compiled (%.2fs since start)", t,
                            " (decode-only)" if decode_only else "",
                            time.perf_counter() - start)
        for t, decode_only in now:  # each compiled step runs once
            layout = self._empty_layout(t)
            jax.block_until_ready(self._run(self._empty_buf(layout), layout, decode_only))
        self.token_table = self._set_token_row(
            self.token_table, self._put(np.int32(0)),
            self._put(np.zeros(self.cfg.max_model_len, np.int32)))
        self._warm_swap()
        rest = [v for v in variants if v not in now]
        if rest:
            self.warmup_done.clear()
            self.compiles_pending = len(rest)
            self._stop_warmup = threading.Event()
            self._warmup_thread = threading.Thread(
                target=self._compile_rest, args=(avals, rest, start), name="jpaged-warmup",
                daemon=True)
            # A process that exits while XLA compiles on another thread aborts
            # in C++ teardown: at exit, stop after the bucket in progress.
            atexit.register(self.stop_warmup)
            self._warmup_thread.start()

    def stop_warmup(self) -> None:
        """Stop a background warm-up after the compile in progress (which cannot
        be interrupted) and wait for it; buckets not compiled stay unused."""
        thread = getattr(self, "_warmup_thread", None)
        if thread is None:
            return
        self._stop_warmup.set()
        thread.join()
        atexit.unregister(self.stop_warmup)

    def _compile_rest(self, avals, variants, start: float) -> None:
        """The background half of `warmup`: one bucket at a time."""
        try:
            for t, decode_only in variants:
                if self._stop_warmup.is_set():
                    logger.info("warm-up stopped; serving with buckets %s", self.ready_buckets)
                    return
                layout, lowered = self._lower(avals, t, decode_only)
                self._compiled[(layout, decode_only)] = lowered.compile()
                self.compiles_pending -= 1
                if not decode_only:
                    self.ready_buckets = sorted(set(self.ready_buckets) | {t})
                logger.info("warm-up (background): bucket of %d tokens%s compiled "
                            "(%.2fs since start)", t, " (decode-only)" if decode_only else "",
                            time.perf_counter() - start)
            logger.info("warm-up: all %d buckets compiled (%.2fs since start)",
                        len(self.buckets), time.perf_counter() - start)
        except Exception:  # noqa: BLE001 - the compiled buckets keep serving
            logger.exception("background warm-up failed; serving with buckets %s",
                             self.ready_buckets)
        finally:
            self.compiles_pending = 0
            self.warmup_done.set()

    def _warm_swap(self) -> None:
        if not self.cfg.num_host_blocks:
            return
        n, most = 1, min(self.cfg.num_host_blocks, self.cfg.num_blocks - 1)
        while True:  # every power-of-two swap size up to the largest possible swap
            ids = np.full(n, self.cfg.num_blocks, np.int32)  # out of range: dropped
            data = jax.device_get(self._gather_blocks(self.kv_caches,
                                                      self._put(np.zeros(n, np.int32))))
            self.kv_caches = self._scatter_blocks(self.kv_caches, self._put(ids),
                                                  self._put_kv(data))
            if n >= most:
                break
            n *= 2
        jax.block_until_ready(self.kv_caches)

    def activation_bytes(self) -> int:
        """Temporary device memory of the largest step, from XLA's memory
        analysis of the compiled program (what the KV budget must leave free)."""
        peak = 0
        for t, decode_only in self._variants():
            if t != self.buckets[-1] and not decode_only:
                continue
            layout = self._empty_layout(t)
            compiled = self._step.lower(
                self.params, self.kv_caches, self.block_table, self.token_table,
                self.last_tokens, self._put(self._empty_buf(layout)), layout,
                decode_only).compile()
            stats = compiled.memory_analysis()
            peak = max(peak, int(getattr(stats, "temp_size_in_bytes", 0) or 0))
        return peak

    # ------------------------------------------------------ rows and swaps
    def release_rows(self, req_ids) -> None:
        self.batch.release(req_ids)

    def _swap(self, out: SchedulerOutput) -> None:
        if out.swap_out:
            dev = np.array([d for d, _ in out.swap_out], np.int32)
            host = np.array([h for _, h in out.swap_out], np.int32)
            data = jax.device_get(self._gather_blocks(self.kv_caches,
                                                      self._put(self._pad_pow2(dev, 0))))
            for (hk, hv), (dk, dv) in zip(self.host_kv, data):
                hk[host], hv[host] = dk[:len(dev)], dv[:len(dev)]
        if out.swap_in:
            host = np.array([h for h, _ in out.swap_in], np.int32)
            dev = self._pad_pow2(np.array([d for _, d in out.swap_in], np.int32),
                                 self.cfg.num_blocks)
            hp = self._pad_pow2(host, 0)
            data = [(hk[hp], hv[hp]) for hk, hv in self.host_kv]
            self.kv_caches = self._scatter_blocks(self.kv_caches, self._put(dev),
                                                  self._put_kv(data))

    def _put_kv(self, data):
        """Host K/V blocks -> device arrays split like the cache."""
        return [tuple(jax.device_put(x, sh) for x, sh in zip(pair, shs))
                for pair, shs in zip(data, self._kv_sh)]

    @staticmethod
    def _pad_pow2(a: np.ndarray, fill: int) -> np.ndarray:
        n = 1 << max(0, (len(a) - 1).bit_length())
        return np.concatenate([a, np.full(n - len(a), fill, a.dtype)])

    # ------------------------------------------------------------ dispatch
    def dispatch(self, out: SchedulerOutput) -> StepHandle:
        """Launch one step without waiting for it; read it with `StepHandle.results`."""
        self.release_rows(out.freed_req_ids)
        self._swap(out)
        built = self.batch.build(out, lambda n: bucket_for(self.ready_buckets, n),
                                 self.eos_token_ids, self.cfg.backend == "pallas")
        if (built.decode_only and not self.warmup_done.is_set()
                and (built.layout, True) not in self._compiled):
            # Its decode-only variant is still compiling: the mixed one computes
            # the same step.
            built = dataclasses.replace(built, decode_only=False)
        if built.block_table_full:
            self.block_table = self._put(self.batch.block_table)
        for row in built.penalty_rows:  # prefix-cache hits never pass through a step
            self.token_table = self._set_token_row(
                self.token_table, self._put(np.int32(row)), self._put(self.batch.history(row)))
        self._last = (built.buf, built.layout, built.decode_only)
        res = self._run(built.buf, built.layout, built.decode_only)
        return StepHandle(out, built, res)

    def replay_last_step(self, iters: int) -> float:
        """Mean seconds of one device step, replaying the last step's inputs
        ``iters`` times (benchmarks only: the replays rewrite the same KV
        slots and sampled-token rows, so generation after it is not meaningful)."""
        assert self._last is not None, "no step has run yet"
        buf, layout, decode_only = self._last
        dev = self._put(buf)
        jax.block_until_ready(self._run(dev, layout, decode_only))
        start = time.perf_counter()
        for _ in range(iters):
            res = self._run(dev, layout, decode_only)
        jax.block_until_ready(res)
        return (time.perf_counter() - start) / iters

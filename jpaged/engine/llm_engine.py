"""LLMEngine: requests in, `RequestOutput`s out, one `step()` at a time.

The path of a request:

1. `add_request` validates the prompt and `SamplingParams`, tokenizes, draws
   a seed if the user gave none, and hands a `Request` to the `Scheduler`
   and its output state to the `OutputProcessor`.
2. `step` asks the scheduler what runs (`schedule`), and dispatches it to
   the device (`ModelRunner.dispatch`: forward, KV write and sampling in one
   jitted call) without waiting for it.
3. With async scheduling (the default) the engine then reads the *previous*
   step's sampled tokens, which the device finished while the host scheduled
   and packed this one; without it, this step's. `Scheduler.update_from_output`
   appends them and the `OutputProcessor` detokenizes, decides stops (freeing
   finished requests' blocks at once) and builds the outputs. A request that
   stops on a token may thus have one more token computed, which is never
   emitted.
4. It returns one `RequestOutput` per user request that changed.

`LLM` (offline) and `AsyncLLM` (serving) are thin loops around this class.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from dataclasses import dataclass

import jax
import numpy as np

from jpaged.layers.attention import resolve_backend
from jpaged.layers.kv_quant import load_kv_scales, resolve_kv_cache_dtype
from jpaged.cache import KVCacheManager
from jpaged.config.engine import ALLOWED_BLOCK_SIZES, EngineConfig
from jpaged.config.model import ModelConfig
from jpaged.distributed import multihost
from jpaged.distributed.mesh import check_split, make_mesh
from jpaged.model_loader.loader import load_model
from jpaged.engine.beam_output import beam_request_output
from jpaged.engine.faults import FaultInjector
from jpaged.engine.encdec_prompt import encdec_prompt, unwrap_prompt_dict
from jpaged.engine.output_processor import OutputProcessor, RequestState
from jpaged.engine.recovery import fail_step
from jpaged.outputs import RequestMetrics, RequestOutput
from jpaged.runner.model_runner import ModelRunner, RunnerConfig, kv_bytes_per_block
from jpaged.sample.beam_search import MAX_BEAM_CANDIDATES, num_candidates
from jpaged.sample.logits_processors import resolve_processors
from jpaged.sampling_params import SamplingParams
from jpaged.sched import Request, RequestStatus, Scheduler, SchedulerConfig
from jpaged.sched.beam import BeamGroup
from jpaged.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_MEMORY = 256 << 20


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    num_compiles: int
    # Wall time in step() and, of it, waiting for the device's tokens.
    num_steps: int = 0
    step_time_s: float = 0.0
    device_wait_s: float = 0.0


def enable_compilation_cache() -> None:
    """Keep compiled steps on disk (``JPAGED_COMPILE_CACHE``, default
    ``~/.cache/jpaged/xla``; ``0`` disables) so a second start skips most of
    the warm-up. A cache directory the user gave JAX already wins."""
    import os

    path = os.environ.get("JPAGED_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "jpaged", "xla")
    if path != "0" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    if jax.config.jax_compilation_cache_dir:
        # Two loads from the cache must not overlap (warm-up compiles in
        # threads): see jpaged/runner/compile_lock.py.
        from jpaged.runner import compile_lock

        compile_lock.install()


def freeze_heap() -> None:
    """Mark the objects alive now (the model, compiled steps, libraries) as
    permanent, so the collector's full passes skip them: one such pass took
    0.44 s in the middle of a 2.2 s benchmark run (vLLM freezes its start-up
    heap too). Objects frozen by an earlier engine are unfrozen and collected
    first, so an engine that is gone does not stay in memory.

    ``JPAGED_GC_FREEZE=0`` skips it: that full collection costs 0.4-1.5 s per
    engine in a process that builds hundreds of them (the test suite)."""
    if os.environ.get("JPAGED_GC_FREEZE", "1") == "0":
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, clock=time.time, faults=None,
                 **kwargs):
        """``faults``: a test-only `jpaged.engine.faults.FaultInjector` (default:
        from ``JPAGED_TEST_FAULTS``, normally unset: no faults)."""
        config = config or EngineConfig(**kwargs)
        # Before anything touches a device: a multi-host run joins its peers.
        multihost.initialize(config.distributed_coordinator, config.num_processes,
                             config.process_id)
        enable_compilation_cache()
        if config.block_size not in ALLOWED_BLOCK_SIZES:
            raise ValueError(f"block_size={config.block_size} is not supported; choose one of "
                             f"{', '.join(map(str, ALLOWED_BLOCK_SIZES))}")
        if config.model is None:
            from jpaged.model_loader import default_model_path

            config = config.replace(model=default_model_path())
        self.config = config
        backend = resolve_backend(config.attention_backend)
        logger.info("attention backend: %s (%s on %s)", backend, config.attention_backend,
                    jax.default_backend())
        start = time.perf_counter()
        tp = config.tensor_parallel_size
        self.mesh = make_mesh(tp)
        load_format, mc = config.load_format, None
        if tp > 1:
            if not (config.model.endswith(".gguf") or load_format == "gguf"):
                mc = ModelConfig.from_pretrained(config.model, config.dtype)
                if mc.is_encoder_decoder:
                    raise ValueError(f"{mc.architecture} runs on one device; use "
                                     f"tensor_parallel_size=1, not {tp}")
                check_split(mc, tp)  # the loader refuses GGUF under TP itself
            if load_format == "orbax":
                raise ValueError("load_format='orbax' holds unsplit params; with "
                                 f"tensor_parallel_size={tp} use safetensors or dummy")
            if load_format == "auto":
                load_format = "safetensors"
        with jax.set_mesh(self.mesh):  # the model's layout and the loader's shards
            self.model_config, graphdef, params = load_model(
                config.model, config.dtype, load_format, config.seed, cfg=mc,
                quantization=config.weight_quantization,
                group_size=config.quantization_group_size)
        mc = self.model_config
        logger.info("loaded %s (%s, %s) in %.2fs", config.model, mc.architecture, mc.dtype,
                    time.perf_counter() - start)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.eos_token_ids = self._eos_ids()

        max_model_len = config.max_model_len or mc.max_position_embeddings
        if max_model_len > mc.max_position_embeddings and mc.rope_scaling is None:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={mc.max_position_embeddings}")
        # Default token budget: 2048 on GPUs, 512 on CPUs (compile time, cache size).
        default_budget = 2048 if jax.default_backend() == "gpu" else 512
        max_tokens = config.max_num_batched_tokens or max(default_budget, config.max_num_seqs)
        if config.max_num_seqs < 1 or max_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if max_tokens < config.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={max_tokens} must be at least "
                             f"max_num_seqs={config.max_num_seqs}")
        kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype)
        kv_scales = (load_kv_scales(config.model, mc.num_hidden_layers)
                     if kv_dtype != "auto" else ())
        per_block = kv_bytes_per_block(mc, config.block_size, backend, tp, kv_dtype)
        self.logits_processors = resolve_processors(config.logits_processors, mc.vocab_size)
        self._processors_by_name = {p.name: p for p in self.logits_processors}

        def runner_config(num_blocks: int, num_host: int = 0) -> RunnerConfig:
            return RunnerConfig(
                num_blocks=num_blocks, block_size=config.block_size,
                max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_tokens,
                max_model_len=max_model_len, backend=backend,
                max_logprobs=config.max_logprobs, num_host_blocks=num_host,
                logits_processors=self.logits_processors, kv_cache_dtype=kv_dtype,
                kv_scales=kv_scales)

        num_blocks = self._num_blocks(
            per_block, lambda: ModelRunner(mc, graphdef, params, runner_config(2),
                                           self.eos_token_ids, self.mesh))
        if config.preemption_mode == "swap" and jax.process_count() > 1:
            raise ValueError("preemption_mode='swap' is not supported across "
                             f"{jax.process_count()} processes; use 'recompute'")
        # The host holds whole blocks: every device's share of them.
        num_host = (int(config.swap_space * (1 << 30)) // (per_block * tp)
                    if config.preemption_mode == "swap" else 0)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB), %d host swap blocks",
                    num_blocks, config.block_size, num_blocks * per_block / 2**20, num_host)
        # Encoder-decoder models cache no prefixes: an encoder block's cross K/V
        # depends on the whole encoder prompt, not on the tokens before it.
        self.kv = KVCacheManager(num_blocks, config.block_size,
                                 config.enable_prefix_caching and not mc.is_encoder_decoder,
                                 num_host_blocks=num_host)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_tokens,
            max_model_len=max_model_len, scheduling_policy=config.scheduling_policy,
            preemption_mode=config.preemption_mode,
            max_queue_wait_ms=config.max_queue_wait_ms), self.kv, clock=clock)
        self.runner = ModelRunner(mc, graphdef, params, runner_config(num_blocks, num_host),
                                  self.eos_token_ids, self.mesh)
        start = time.perf_counter()
        if config.compile_all_buckets:
            # Several processes must pick the same bucket every step (their
            # programs meet in collectives): no background compiles there.
            self.runner.warmup(background=config.background_warmup
                               and jax.process_count() == 1)
        logger.info("warm-up: %d compiles in %.2fs%s", self.runner.num_compiles,
                    time.perf_counter() - start,
                    "" if self.runner.warmup_done.is_set() else
                    f"; buckets {self.runner.ready_buckets} ready, the others compiling")
        self.max_model_len = max_model_len
        self.output = OutputProcessor(self.tokenizer, self.scheduler, max_model_len)
        self.faults = faults if faults is not None else FaultInjector.from_env()
        self.output.faults = self.faults
        self._step_out = None  # the step in progress, for recovery if it raises
        self._last_done = 0.0  # when the previous step's results were read
        self.async_scheduling = config.async_scheduling
        self._inflight = None  # the dispatched step whose tokens are not read yet
        self._rng = np.random.default_rng(config.seed)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.peak_kv_usage = 0.0
        self.peak_num_running = 0
        self.peak_slot_utilization = (0.0, 0)  # (share of allocated slots in use, busiest step)
        self.num_steps, self.step_time_s, self.device_wait_s = 0, 0.0, 0.0
        freeze_heap()

    # ------------------------------------------------------------- set-up
    def _eos_ids(self) -> set[int]:
        import json
        import os

        ids = set(self.model_config.eos_token_ids)
        gen = os.path.join(self.config.model, "generation_config.json")
        if os.path.isfile(gen):
            with open(gen) as f:
                eos = json.load(f).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _num_blocks(self, per_block: int, probe_runner) -> int:
        """KV blocks from num_kv_blocks, kv_cache_memory, or on a GPU the
        gpu_memory_utilization share of device memory left after the weights
        and the largest step's profiled activations (``probe_runner()`` builds a
        runner with a two-block cache whose compiled step XLA measures)."""
        c = self.config
        if c.num_kv_blocks is not None:
            if c.num_kv_blocks < 2:
                raise ValueError(f"num_kv_blocks={c.num_kv_blocks} must be at least 2")
            return c.num_kv_blocks
        if c.kv_cache_memory is not None:
            budget = c.kv_cache_memory
        elif jax.default_backend() == "gpu":
            if not 0 < c.gpu_memory_utilization <= 1:
                raise ValueError(f"gpu_memory_utilization={c.gpu_memory_utilization} must be "
                                 "in (0, 1]")
            # Per device: the weights and the cache are split alike over the mesh.
            stats = self.mesh.local_devices[0].memory_stats() or {}
            limit = stats.get("bytes_limit", 0)
            used = stats.get("bytes_in_use", 0)  # the weights, loaded already
            act = probe_runner().activation_bytes()
            logger.info("profiled activation peak of the largest step: %.1f MiB", act / 2**20)
            budget = int(limit * c.gpu_memory_utilization) - used - act
        else:
            budget = CPU_DEFAULT_KV_MEMORY
        # Every process must schedule alike: they agree on the smallest cache.
        num = multihost.agree_min(budget // per_block + 1)  # + the null block
        if num < 2:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of "
                             f"{per_block} bytes; raise kv_cache_memory")
        return int(num)

    # ------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0,
                    cache_salt: str | None = None, deadline_ms: float | None = None,
                    ttft_slo_ms: float | None = None) -> None:
        """Queue a request. ``prompt`` is a string, a list of token ids, or a dict
        with ``prompt`` or ``prompt_token_ids``. ``deadline_ms``/``ttft_slo_ms``
        override the SamplingParams fields of the same names.

        Raises ValueError for bad input, `RequestRefused` when the scheduling
        policy's admission control refuses the request."""
        params = params or SamplingParams()
        if deadline_ms is not None or ttft_slo_ms is not None:
            params = dataclasses.replace(
                params, deadline_ms=params.deadline_ms if deadline_ms is None else deadline_ms,
                ttft_slo_ms=params.ttft_slo_ms if ttft_slo_ms is None else ttft_slo_ms)
        if request_id in self.output.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        text, ids, seq_ids, encoder_len = self._prompt(prompt)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.config.max_logprobs:
                raise ValueError(f"{name}={k} is over max_logprobs={self.config.max_logprobs}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority={priority!r} must be an integer")
        params = params.clone()
        params.processor_rows = self._processor_rows(params)
        params.all_stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            params.all_stop_token_ids |= self.eos_token_ids
        max_tokens = params.max_tokens
        room = self.max_model_len - len(seq_ids)
        if encoder_len:  # the decoder's positions have their own limit
            room = self.model_config.encoder_decoder.max_positions - len(ids)
            if max_tokens is not None and max_tokens > room:
                raise ValueError(f"decoder prompt ({len(ids)} tokens) plus max_tokens "
                                 f"({max_tokens}) is over the model's max_position_embeddings="
                                 f"{self.model_config.encoder_decoder.max_positions}")
        if max_tokens is None:
            max_tokens = room
            if max_tokens < 1:
                raise ValueError(f"prompt has {len(ids)} tokens, no room under "
                                 f"max_model_len={self.max_model_len}")
        if params.num_beams > 1:
            k = num_candidates(params.num_beams, len(params.all_stop_token_ids))
            if k > min(MAX_BEAM_CANDIDATES, self.model_config.vocab_size):
                raise ValueError(
                    f"num_beams={params.num_beams} with {len(params.all_stop_token_ids)} stop "
                    f"ids keeps {k} candidates a step, over the "
                    f"{min(MAX_BEAM_CANDIDATES, self.model_config.vocab_size)} the step returns")
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**63 - 1))
        now = self.scheduler.clock() if arrival_time is None else arrival_time
        req = Request(request_id=request_id, group_id=request_id, prompt_token_ids=seq_ids,
                      encoder_len=encoder_len,
                      sampling_params=params, arrival_time=now, seed=seed, priority=priority,
                      cache_salt=cache_salt, max_tokens=max_tokens,
                      forked=params.n == 1,
                      deadline=None if params.deadline_ms is None
                      else now + params.deadline_ms / 1000,
                      ttft_deadline=None if params.ttft_slo_ms is None
                      else now + params.ttft_slo_ms / 1000)
        if params.num_beams > 1:
            BeamGroup(req)
        self.scheduler.add_request(req)  # raises on max_model_len / cache size
        self.output.add(RequestState(request_id, text, ids, params,
                                     RequestMetrics(arrival_time=now), samples=[req]))

    def _processor_rows(self, sp: SamplingParams) -> dict:
        """Pack the row parameters of every processor ``sp`` enables (ValueError
        for an unknown name or a bad argument)."""
        args = {}
        if sp.logit_bias:
            args["logit_bias"] = sp.logit_bias
        if sp.allowed_token_ids is not None:
            args["allowed_token_ids"] = sp.allowed_token_ids
        if sp.bad_words:
            words = []  # as vLLM: each word alone and after a space
            for w in sp.bad_words:
                for text in (w, " " + w.lstrip()):
                    ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
                    if ids and ids not in words:
                        words.append(ids)
            args["bad_words"] = words
        for name, arg in (sp.logits_processors or {}).items():
            if name in args:
                raise ValueError(f"logits processor {name!r} is enabled twice")
            args[name] = arg
        rows = {}
        for name, arg in args.items():
            proc = self._processors_by_name.get(name)
            if proc is None:
                raise ValueError(f"logits_processors: {name!r} is not registered (registered: "
                                 f"{', '.join(self._processors_by_name)})")
            row = np.asarray(proc.row_params(arg, self.model_config.vocab_size), np.int32)
            if row.shape != (proc.num_params,):
                raise ValueError(f"logits processor {name!r}: row_params returned shape "
                                 f"{row.shape}, not ({proc.num_params},)")
            rows[name] = row
        return rows

    def _prompt(self, prompt) -> tuple[str | None, list[int], list[int], int]:
        """(text, the outputs' prompt ids, the engine sequence, encoder length):
        for decoder-only models the sequence is the prompt (encoder length 0);
        see `jpaged.engine.encdec_prompt` for encoder-decoder ones."""
        mc = self.model_config
        if not mc.is_encoder_decoder:
            text, ids = self._tokenize(prompt)
            return text, ids, ids, 0
        p = encdec_prompt(prompt, self.tokenizer, mc.encoder_decoder, self.config.block_size,
                          self._check_ids)
        if len(p.engine_ids) - len(p.decoder_ids) > self.scheduler.config.max_num_batched_tokens:
            raise ValueError(f"encoder prompt of {p.encoder_len} tokens (padded to KV blocks) "
                             "runs in one step and is over max_num_batched_tokens="
                             f"{self.scheduler.config.max_num_batched_tokens}")
        return p.text, p.decoder_ids, p.engine_ids, p.encoder_len

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.model_config.vocab_size})")

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        prompt = unwrap_prompt_dict(prompt, "a prompt dict")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(i) for i in prompt]
            if not ids:
                raise ValueError("prompt_token_ids is empty")
            self._check_ids(ids)
            return None, ids
        raise ValueError(f"prompt must be a string or a list of token ids, got "
                         f"{type(prompt).__name__}")

    def abort_request(self, request_ids) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for gid in request_ids:
            state = self.output.pop(gid)
            if state is not None:
                reqs = state.samples
                if reqs and reqs[0].beam is not None:
                    reqs = reqs[0].beam.beams
                self.scheduler.finish_requests([r.request_id for r in reqs],
                                               RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.output.requests)

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        try:
            return self._step()
        finally:
            self.num_steps += 1
            self.step_time_s += time.perf_counter() - start

    def _step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self._step_out = out
        if self.faults is not None:
            self.faults.check_step(out.scheduled)
        ended = self.output.end_early(out.expired, out.refused) \
            if out.expired or out.refused else []
        ended += self._beam_outputs()  # beam searches past their deadline
        handle = None
        if out.scheduled:
            self._record_utilization()
            # Prompt tokens computed this step (recomputed ones after preemption too).
            self.prompt_tokens_total += sum(
                max(0, min(sr.start + sr.num_new_tokens, sr.request.num_prompt_tokens)
                    - sr.start) for sr in out.scheduled)
            handle = self.runner.dispatch(out)
        elif out.freed_req_ids:
            self.runner.release_rows(out.freed_req_ids)
        if handle is not None:
            handle.dispatch_time = time.perf_counter()
        if not self.async_scheduling:
            return ended + (self._process(handle) if handle is not None else [])
        prev, self._inflight = self._inflight, handle
        return ended + (self._process(prev) if prev is not None else [])

    def _process(self, handle) -> list[RequestOutput]:
        """Read a dispatched step's tokens and turn them into outputs."""
        wait = time.perf_counter()
        tokens, lp, rank, top_ids, top_lps, soff, beam_ids, beam_lps = handle.results()
        self.device_wait_s += time.perf_counter() - wait
        out = handle.out
        # Teach the step-time model. Steps overlap (the next is dispatched
        # before this one's results are read) but run one after the other:
        # this one started when it was dispatched or when the previous
        # finished, whichever is later.
        done = time.perf_counter()
        self.scheduler.estimator.record(out.num_scheduled_tokens,
                                        done - max(handle.dispatch_time, self._last_done))
        self._last_done = done
        toks = tokens.tolist()
        samples, results, beams = [], {}, {}
        for i, sr in enumerate(handle.out.scheduled):
            if not sr.num_samples:
                samples.append(())
                continue
            a, b = int(soff[i]), int(soff[i + 1])
            samples.append(toks[a:b])
            if sr.request.beam is not None:
                beams[i] = (beam_ids[a].tolist(), beam_lps[a].tolist())
            k = sr.request.sampling_params.logprobs
            if k is not None:
                for j in range(a, b):
                    results[(sr.request.group_id, sr.request.sample_index + j - a)] = (
                        float(lp[j]), int(rank[j]), top_ids[j, :k], top_lps[j, :k])
        if handle.built is not None and handle.built.plp_spans:
            self.output.record_prompt_logprobs(out.scheduled, handle.built.plp_spans,
                                               handle.prompt_logprobs())
        sched = self.scheduler
        updated = sched.update_from_output(handle.out, samples, beams)
        self.generation_tokens_total += len(updated) + len(beams)
        return self.output.process(updated, results) + self._beam_outputs()

    def fail_step(self, err: BaseException) -> list[RequestOutput]:
        """After `step` raised: end its requests with `RequestFailed` (see
        `jpaged.engine.recovery`) and return their final outputs."""
        return fail_step(self, err)

    def _beam_outputs(self) -> list[RequestOutput]:
        """Final outputs of the beam searches the scheduler finished."""
        outputs = []
        for group in self.scheduler.finished_beam_groups:
            state = self.output.pop(group.group_id)
            if state is not None:
                outputs.append(beam_request_output(state, group, self.tokenizer))
        self.scheduler.finished_beam_groups.clear()
        return outputs

    def _record_utilization(self) -> None:
        """Peak KV usage and concurrency, and the share of allocated KV slots
        holding a token at the busiest step. The share needs a walk over the
        running requests' blocks, so it is taken only when the blocks in use
        pass the last measured peak by 1% of the pool: a few dozen walks in
        a run, none in a steady state."""
        kv = self.kv
        self.peak_kv_usage = max(self.peak_kv_usage, kv.usage)
        self.peak_num_running = max(self.peak_num_running, len(self.scheduler.running))
        blocks = kv.num_blocks - 1 - kv.num_free_blocks
        if not blocks or blocks < self.peak_slot_utilization[1] + max(1, kv.num_blocks // 100):
            return
        # Each block counted once: a block shared by forks or prefix hits
        # holds its tokens once. num_computed_tokens already counts this step.
        filled: dict[int, int] = {}
        for r in self.scheduler.running:
            n = r.num_computed_tokens
            for j, b in enumerate(kv.req_to_blocks.get(r.request_id, ())):
                filled[b.block_id] = max(filled.get(b.block_id, 0),
                                         min(kv.block_size, n - j * kv.block_size))
        self.peak_slot_utilization = (sum(filled.values()) / (blocks * kv.block_size), blocks)

    # --------------------------------------------------------------- stats
    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage, prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            num_compiles=self.runner.num_compiles, num_steps=self.num_steps,
            step_time_s=self.step_time_s, device_wait_s=self.device_wait_s)


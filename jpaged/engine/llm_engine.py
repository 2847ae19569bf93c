"""LLMEngine: requests in, `RequestOutput`s out, one `step()` at a time.

The path of a request:

1. `add_request` validates the prompt and `SamplingParams`, tokenizes, draws
   a seed if the user gave none, and hands a `Request` to the `Scheduler`.
2. `step` asks the scheduler what runs (`schedule`), runs it on the device
   (`ModelRunner.execute`: forward, KV write and sampling in one jitted call),
   and applies the sampled tokens (`Scheduler.update_from_output`).
3. For each sequence that got a token, the engine records logprobs, extends
   its text with the incremental detokenizer, checks stop tokens, lengths
   and stop strings, and finishes it (its blocks go back at once).
4. It returns one cumulative `RequestOutput` per user request that changed.

`LLM` (offline) and `AsyncLLM` (serving) are thin loops around this class.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from jpaged.layers.attention import resolve_backend
from jpaged.cache import KVCacheManager
from jpaged.config.engine import ALLOWED_BLOCK_SIZES, EngineConfig
from jpaged.config.model import ModelConfig
from jpaged.model_loader.loader import load_model
from jpaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jpaged.runner.model_runner import ModelRunner, RunnerConfig, kv_bytes_per_block
from jpaged.sampling_params import SamplingParams
from jpaged.sched import Request, RequestStatus, Scheduler, SchedulerConfig
from jpaged.tokenizer import IncrementalDetokenizer, load_tokenizer

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


@dataclass(slots=True)
class _Group:
    """A user request: its prompt and the n samples generated for it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: list = field(default_factory=list)  # [Request], index = sample_index
    detok: dict = field(default_factory=dict)  # sample index -> IncrementalDetokenizer
    texts: dict = field(default_factory=dict)  # sample index -> final text
    num_cached_tokens: int = 0


def enable_compilation_cache() -> None:
    """Keep compiled steps on disk (``JPAGED_COMPILE_CACHE``, default
    ``~/.cache/jpaged/xla``; ``0`` disables) so a second start skips most of
    the warm-up. A cache directory the user gave JAX already wins."""
    import os

    path = os.environ.get("JPAGED_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "jpaged", "xla")
    if path == "0" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        config = config or EngineConfig(**kwargs)
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
        self.model_config, graphdef, params = load_model(
            config.model, config.dtype, config.load_format, config.seed,
            quantization=config.weight_quantization, group_size=config.quantization_group_size)
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
        per_block = kv_bytes_per_block(mc, config.block_size, backend)

        def runner_config(num_blocks: int, num_host: int = 0) -> RunnerConfig:
            return RunnerConfig(
                num_blocks=num_blocks, block_size=config.block_size,
                max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_tokens,
                max_model_len=max_model_len, backend=backend,
                max_logprobs=config.max_logprobs, num_host_blocks=num_host)

        num_blocks = self._num_blocks(
            per_block, lambda: ModelRunner(mc, graphdef, params, runner_config(2)))
        num_host = (int(config.swap_space * (1 << 30)) // per_block
                    if config.preemption_mode == "swap" else 0)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB), %d host swap blocks",
                    num_blocks, config.block_size, num_blocks * per_block / 2**20, num_host)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                 num_host_blocks=num_host)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max_tokens,
            max_model_len=max_model_len, scheduling_policy=config.scheduling_policy,
            preemption_mode=config.preemption_mode), self.kv)
        self.runner = ModelRunner(mc, graphdef, params, runner_config(num_blocks, num_host))
        start = time.perf_counter()
        if config.compile_all_buckets:
            self.runner.warmup()
        logger.info("warm-up: %d compiles in %.2fs", self.runner.num_compiles,
                    time.perf_counter() - start)
        self.max_model_len = max_model_len
        self.groups: dict[str, _Group] = {}
        self._rng = np.random.default_rng(config.seed)
        self._ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.peak_kv_usage = 0.0
        self.peak_num_running = 0
        self.peak_slot_utilization = (0.0, 0)  # (share of allocated slots in use, busiest step)

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
            stats = jax.devices()[0].memory_stats() or {}
            limit = stats.get("bytes_limit", 0)
            used = stats.get("bytes_in_use", 0)  # the weights, loaded already
            act = probe_runner().activation_bytes()
            logger.info("profiled activation peak of the largest step: %.1f MiB", act / 2**20)
            budget = int(limit * c.gpu_memory_utilization) - used - act
        else:
            budget = CPU_DEFAULT_KV_MEMORY
        num = budget // per_block + 1  # + the null block
        if num < 2:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of "
                             f"{per_block} bytes; raise kv_cache_memory")
        return int(num)

    # ------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0,
                    cache_salt: str | None = None) -> None:
        """Queue a request. ``prompt`` is a string, a list of token ids, or a dict
        with ``prompt`` or ``prompt_token_ids``."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ValueError(f"request_id={request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} is over max_logprobs="
                             f"{self.config.max_logprobs}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority={priority!r} must be an integer")
        params = params.clone()
        params.all_stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            params.all_stop_token_ids |= self.eos_token_ids
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - len(ids)
            if max_tokens < 1:
                raise ValueError(f"prompt has {len(ids)} tokens, no room under "
                                 f"max_model_len={self.max_model_len}")
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**63 - 1))
        now = time.time() if arrival_time is None else arrival_time
        req = Request(request_id=request_id, group_id=request_id, prompt_token_ids=ids,
                      sampling_params=params, arrival_time=now, seed=seed, priority=priority,
                      cache_salt=cache_salt, max_tokens=max_tokens,
                      forked=params.n == 1)
        self.scheduler.add_request(req)  # raises on max_model_len / cache size
        self.groups[request_id] = _Group(request_id, text, ids, params,
                                         RequestMetrics(arrival_time=now), samples=[req])

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(i) for i in prompt]
            if not ids:
                raise ValueError("prompt_token_ids is empty")
            bad = [i for i in ids if not 0 <= i < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.model_config.vocab_size})")
            return None, ids
        raise ValueError(f"prompt must be a string or a list of token ids, got "
                         f"{type(prompt).__name__}")

    def abort_request(self, request_ids) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for gid in request_ids:
            group = self.groups.pop(gid, None)
            if group is not None:
                self.scheduler.finish_requests([r.request_id for r in group.samples],
                                               RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.scheduled:
            if out.freed_req_ids:
                self.runner.release_rows(out.freed_req_ids)
            return []
        self._record_utilization(out)
        results = self.runner.execute(out)
        # Prompt tokens computed this step (recomputed ones after preemption too).
        self.prompt_tokens_total += sum(
            max(0, min(r.num_computed_tokens + sr.num_new_tokens, r.num_prompt_tokens)
                - r.num_computed_tokens)
            for sr in out.scheduled for r in [sr.request])
        samples = [[r.token for r in rows] for rows in results]
        updated = self.scheduler.update_from_output(out, samples)
        by_req = {}
        for sr, rows in zip(out.scheduled, results):
            for k, res in enumerate(rows):
                by_req[(sr.request.group_id, sr.request.sample_index + k)] = res
        now = time.time()
        touched: dict[str, _Group] = {}
        for req in updated:
            group = self.groups.get(req.group_id)
            if group is None:
                continue
            if req.sample_index >= len(group.samples):
                group.samples.append(req)
            group.samples[req.sample_index] = req
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
                group.metrics.first_scheduled_time = req.first_scheduled_time
                group.num_cached_tokens = max(req.num_cached_tokens, 0)
            group.metrics.last_token_time = now
            self.generation_tokens_total += 1
            self._process_token(group, req, by_req[(req.group_id, req.sample_index)])
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            finished = all(r.status.finished for r in group.samples) and (
                len(group.samples) == group.params.n)
            if finished:
                group.metrics.finished_time = now
                group.metrics.num_preemptions = sum(r.num_preemptions for r in group.samples)
                del self.groups[group.request_id]
            outputs.append(self._make_output(group, finished))
        return outputs

    def _record_utilization(self, out) -> None:
        """Peak KV usage and concurrency, and the share of allocated KV slots
        holding a token state at the busiest step (the most blocks in use),
        counted after this step's writes."""
        self.peak_kv_usage = max(self.peak_kv_usage, self.kv.usage)
        self.peak_num_running = max(self.peak_num_running, len(self.scheduler.running))
        blocks = self.kv.num_blocks - 1 - self.kv.num_free_blocks
        if not blocks or blocks < self.peak_slot_utilization[1]:
            return
        scheduled = {sr.request.request_id: sr.num_new_tokens for sr in out.scheduled}
        # Each block counted once: a block shared by forks or prefix hits holds
        # its tokens once.
        filled: dict[int, int] = {}
        for r in self.scheduler.running:
            n = r.num_computed_tokens + scheduled.get(r.request_id, 0)
            for j, b in enumerate(self.kv.req_to_blocks.get(r.request_id, ())):
                filled[b.block_id] = max(filled.get(b.block_id, 0),
                                         min(self.kv.block_size, n - j * self.kv.block_size))
        self.peak_slot_utilization = (sum(filled.values()) / (blocks * self.kv.block_size),
                                      blocks)

    def _process_token(self, group: _Group, req: Request, res) -> None:
        sp = req.sampling_params
        tok = req.all_token_ids[-1]
        if req.first_token_time is None:
            req.first_token_time = time.time()
        if sp.logprobs is not None:
            req.cumulative_logprob += res.logprob
            entry = {tok: Logprob(res.logprob, res.rank, self._decode_one(tok))}
            for rank, (tid, lp) in enumerate(zip(res.top_ids, res.top_logprobs), start=1):
                entry.setdefault(int(tid), Logprob(float(lp), rank, self._decode_one(int(tid))))
            req.logprobs.append(entry)
        stopped = self.scheduler.check_token_stop(req)
        detok = group.detok.get(req.sample_index)
        if detok is None:
            detok = group.detok[req.sample_index] = IncrementalDetokenizer(
                self.tokenizer, sp.skip_special_tokens)
        prev_len = len(detok.text)
        if not (stopped and req.status == RequestStatus.FINISHED_STOPPED
                and not sp.include_stop_str_in_output):
            detok.step(tok)
        if stopped:
            detok.finish()
        text = detok.text
        if sp.stop and not (stopped and req.stop_reason is None
                            and req.status == RequestStatus.FINISHED_STOPPED):
            hit = _find_stop(text, sp.stop, prev_len)
            if hit is not None:
                pos, stop = hit
                text = text[:pos + len(stop)] if sp.include_stop_str_in_output else text[:pos]
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = stop
                stopped = True
        group.texts[req.sample_index] = text
        if stopped:
            self.scheduler.finish_requests([req.request_id], req.status)

    def _decode_one(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def _make_output(self, group: _Group, finished: bool) -> RequestOutput:
        outs = []
        hold = max((len(s) for s in group.params.stop), default=1) - 1
        for req in sorted(group.samples, key=lambda r: r.sample_index):
            sp = req.sampling_params
            text = group.texts.get(req.sample_index, "")
            if hold and not req.status.finished:
                text = text[:max(0, len(text) - hold)]  # may be the start of a stop string
            outs.append(CompletionOutput(
                index=req.sample_index, text=text, token_ids=list(req.output_token_ids),
                cumulative_logprob=req.cumulative_logprob if sp.logprobs is not None else None,
                logprobs=list(req.logprobs) if sp.logprobs is not None else None,
                finish_reason=req.finish_reason, stop_reason=req.stop_reason))
        return RequestOutput(
            request_id=group.request_id, prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids, outputs=outs, finished=finished,
            num_cached_tokens=group.num_cached_tokens, metrics=group.metrics)

    # --------------------------------------------------------------- stats
    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage, prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            num_compiles=self.runner.num_compiles)


def _find_stop(text: str, stops: list[str], prev_len: int):
    """Earliest stop string that ends in the new part of ``text``."""
    best = None
    for s in stops:
        i = text.find(s, max(0, prev_len - len(s) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


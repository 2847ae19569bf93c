"""ModelRunner: turns a `SchedulerOutput` into one jitted device step.

Device state owned here (all pytrees, rebound after every call because the
step donates them):

* ``kv_caches``: per layer ``(k, v)``, each ``[num_blocks, block_size,
  num_kv_heads, head_dim]`` (the layout every attention backend reads);
* ``block_table``: ``[max_num_seqs, max_blocks_per_seq]`` int32, one row per
  running request. The host keeps a mirror; each step sends only the entries
  that changed (padded update lists applied with ``.at[].set`` inside the
  step), and re-uploads the whole table only when more changed than fit;
* ``token_table``: ``[max_num_seqs, max_model_len]`` int32 token history per
  row, uploaded only on steps where some request uses a penalty.

Per-step inputs are padded to a bucket of the token count ``T`` (powers of
two up to ``max_num_batched_tokens``); the sequence/sample-row count is
``S = min(T, max_num_seqs)``, so there is one compiled step per token bucket
(two with the Pallas backend: decode-only and mixed). `warmup` compiles them
all at start-up; ``num_compiles`` counts traces of the step and must not
move afterwards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpaged.layers.attention import AttentionMetadata
from jpaged.cache.kv_cache_manager import cdiv
from jpaged.config.model import ModelConfig
from jpaged.sample.sampler import SamplingMetadata, sample
from jpaged.sched.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

MAX_BANNED = 16  # token ids a row can ban at once (EOS + stop_token_ids during min_tokens)


def kv_cache_dtype(cfg: ModelConfig, backend: str):
    """The KV cache's dtype: the model's, except bfloat16 on XLA:CPU, whose
    scatter into a bfloat16 buffer copies the whole buffer (measured: 75 ms a
    step for a 64 MiB cache, against 0.01 ms for float16 or float32), so
    there the cache is float32."""
    if cfg.jnp_dtype == jnp.bfloat16 and backend == "reference" and (
            jax.default_backend() == "cpu"):
        return jnp.float32
    return cfg.jnp_dtype


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, backend: str) -> int:
    return (2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim
            * jnp.dtype(kv_cache_dtype(cfg, backend)).itemsize)


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


@dataclass(slots=True)
class SampleResult:
    token: int
    logprob: float
    rank: int
    top_ids: np.ndarray | None  # [K]
    top_logprobs: np.ndarray | None  # [K]


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """Step sizes the runner compiles: powers of two from 8, and from 128 up
    also 1.5x each power of two; the largest is the token budget itself.

    Small steps are bound by reading the weights, so their padding is nearly
    free; large ones are bound by arithmetic, where a 128-sequence decode
    plus one 40-token prompt (168 tokens) would waste a third of a 256-token
    step (measured: 158 such steps were 46% of a 512-request CPU run).
    """
    out, b = [], 8
    while b < max_num_batched_tokens:
        out.append(b)
        if b >= 128 and b * 3 // 2 < max_num_batched_tokens:
            out.append(b * 3 // 2)
        b *= 2
    return out + [max_num_batched_tokens]


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, graphdef, params, cfg: RunnerConfig):
        self.model_cfg, self.graphdef, self.params, self.cfg = model_cfg, graphdef, params, cfg
        self.max_blocks_per_seq = cdiv(cfg.max_model_len, cfg.block_size)
        shape = (cfg.num_blocks, cfg.block_size, model_cfg.num_key_value_heads, model_cfg.head_dim)
        dt = kv_cache_dtype(model_cfg, cfg.backend)
        self.kv_caches = [(jnp.zeros(shape, dt), jnp.zeros(shape, dt))
                          for _ in range(model_cfg.num_hidden_layers)]
        self.host_table = np.zeros((cfg.max_num_seqs, self.max_blocks_per_seq), np.int32)
        self.block_table = jnp.asarray(self.host_table)
        self.host_tokens = np.zeros((cfg.max_num_seqs, cfg.max_model_len), np.int32)
        self.token_table = jnp.asarray(self.host_tokens)
        self._token_rows_synced = np.zeros(cfg.max_num_seqs, np.int64)
        self.rows: dict[str, int] = {}
        self.free_rows = list(range(cfg.max_num_seqs - 1, -1, -1))
        host_shape = (cfg.num_host_blocks,) + shape[1:]
        self.host_kv = [(np.zeros(host_shape, dt), np.zeros(host_shape, dt))
                        for _ in range(model_cfg.num_hidden_layers)] if cfg.num_host_blocks else []
        self.buckets = token_buckets(cfg.max_num_batched_tokens)
        self.num_compiles = 0
        self._step = jax.jit(self._step_impl, donate_argnums=(1, 2),
                             static_argnames=("decode_only",))
        self._gather_blocks = jax.jit(
            lambda kv, ids: [(k[ids], v[ids]) for k, v in kv])
        self._scatter_blocks = jax.jit(
            lambda kv, ids, data: [(k.at[ids].set(dk, mode="drop"), v.at[ids].set(dv, mode="drop"))
                                   for (k, v), (dk, dv) in zip(kv, data)], donate_argnums=(0,))

    # ----------------------------------------------------------- the step
    def _step_impl(self, params, kv_caches, block_table, token_table, inp, decode_only=False):
        self.num_compiles += 1  # runs at trace time only
        t, s = inp["input_ids"].shape[0], inp["seq_rows"].shape[0]
        logger.info("compiling step: %d tokens, %d sequences%s", t, s,
                    " (decode-only)" if decode_only else "")
        block_table = block_table.at[inp["upd_rows"], inp["upd_cols"]].set(
            inp["upd_vals"], mode="drop")
        # Copy-on-write: duplicate shared blocks before anything writes them.
        src, dst = inp["copy_src"], inp["copy_dst"]
        kv_caches = [(k.at[dst].set(k[src], mode="drop"), v.at[dst].set(v[src], mode="drop"))
                     for k, v in kv_caches]
        md = AttentionMetadata(
            slot_mapping=inp["slot_mapping"],
            block_tables=block_table[inp["seq_rows"]],
            context_lens=inp["context_lens"], query_start_loc=inp["query_start_loc"],
            backend=self.cfg.backend, decode_only=decode_only)
        model = nnx.merge(self.graphdef, params)
        hidden, kv_caches = model(inp["input_ids"], inp["positions"], kv_caches, md)
        logits = model.compute_logits(hidden[inp["logits_indices"]])  # [S, V]
        results = sample(logits, inp["sampling"], token_table, self.cfg.max_logprobs)
        return kv_caches, block_table, results

    # ------------------------------------------------------------ warm-up
    def warmup(self) -> None:
        """Compile every bucket now, so that serving never compiles."""
        variants = [False, True] if self.cfg.backend == "pallas" else [False]
        for prev, t in zip([0] + self.buckets, self.buckets):
            for decode_only in variants:
                if decode_only and prev >= self.cfg.max_num_seqs:
                    continue  # no decode step of <= max_num_seqs tokens lands here
                start = time.perf_counter()
                inp = self._empty_inputs(t)
                self.kv_caches, self.block_table, res = self._step(
                    self.params, self.kv_caches, self.block_table, self.token_table, inp,
                    decode_only=decode_only)
                jax.block_until_ready(res)
                logger.info("warm-up: bucket of %d tokens%s ready in %.2fs", t,
                            " (decode-only)" if decode_only else "",
                            time.perf_counter() - start)

    def activation_bytes(self) -> int:
        """Temporary device memory of the largest step, from XLA's memory
        analysis of the compiled program (what the KV budget must leave free)."""
        variants = [False, True] if self.cfg.backend == "pallas" else [False]
        peak = 0
        for decode_only in variants:
            t = self.buckets[-1] if not decode_only else self._bucket(
                min(self.cfg.max_num_seqs, self.buckets[-1]))
            compiled = self._step.lower(
                self.params, self.kv_caches, self.block_table, self.token_table,
                self._empty_inputs(t), decode_only=decode_only).compile()
            stats = compiled.memory_analysis()
            peak = max(peak, int(getattr(stats, "temp_size_in_bytes", 0) or 0))
        return peak

    def _bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise AssertionError(f"{n} tokens exceed max_num_batched_tokens")

    def _empty_inputs(self, t: int) -> dict:
        s = min(t, self.cfg.max_num_seqs)
        u, c = t + s, s
        nb, oob_row = self.cfg.num_blocks, self.cfg.max_num_seqs
        z = lambda n, v=0, dt=np.int32: np.full((n,), v, dt)  # noqa: E731
        return dict(
            input_ids=z(t), positions=z(t), slot_mapping=z(t, nb * self.cfg.block_size),
            seq_rows=z(s), context_lens=z(s), query_start_loc=z(s + 1), logits_indices=z(s),
            upd_rows=z(u, oob_row), upd_cols=z(u), upd_vals=z(u),
            copy_src=z(c), copy_dst=z(c, nb),
            sampling=SamplingMetadata(
                temperature=z(s, 0, np.float32), top_k=z(s), top_p=z(s, 1, np.float32),
                min_p=z(s, 0, np.float32), presence_penalty=z(s, 0, np.float32),
                frequency_penalty=z(s, 0, np.float32), repetition_penalty=z(s, 1, np.float32),
                seeds=np.zeros((s, 2), np.uint32), sample_index=z(s), output_len=z(s),
                prompt_len=z(s), token_rows=z(s),
                banned=np.full((s, MAX_BANNED), self.model_cfg.vocab_size, np.int32),
                any_penalty=np.bool_(False), any_filter=np.bool_(False),
                any_logprobs=np.bool_(False), any_random=np.bool_(False)),
        )

    # ------------------------------------------------------ rows and swaps
    def release_rows(self, req_ids) -> None:
        for rid in req_ids:
            row = self.rows.pop(rid, None)
            if row is not None:
                self.free_rows.append(row)
                self._token_rows_synced[row] = 0

    def _row(self, rid: str) -> int:
        row = self.rows.get(rid)
        if row is None:
            row = self.rows[rid] = self.free_rows.pop()
            self._token_rows_synced[row] = 0
        return row

    def _swap(self, out: SchedulerOutput) -> None:
        if out.swap_out:
            dev = np.array([d for d, _ in out.swap_out], np.int32)
            host = np.array([h for _, h in out.swap_out], np.int32)
            data = jax.device_get(self._gather_blocks(self.kv_caches, self._pad_pow2(dev, 0)))
            for (hk, hv), (dk, dv) in zip(self.host_kv, data):
                hk[host], hv[host] = dk[:len(dev)], dv[:len(dev)]
        if out.swap_in:
            host = np.array([h for h, _ in out.swap_in], np.int32)
            dev = self._pad_pow2(np.array([d for _, d in out.swap_in], np.int32),
                                 self.cfg.num_blocks)
            hp = self._pad_pow2(host, 0)
            data = [(hk[hp], hv[hp]) for hk, hv in self.host_kv]
            self.kv_caches = self._scatter_blocks(self.kv_caches, dev, data)

    @staticmethod
    def _pad_pow2(a: np.ndarray, fill: int) -> np.ndarray:
        n = 1 << max(0, (len(a) - 1).bit_length())
        return np.concatenate([a, np.full(n - len(a), fill, a.dtype)])

    # ------------------------------------------------------------ execute
    def execute(self, out: SchedulerOutput) -> list[list[SampleResult]]:
        """Run one step. Returns, per scheduled request, one result per sample row."""
        self.release_rows(out.freed_req_ids)
        self._swap(out)
        cfg, bs = self.cfg, self.cfg.block_size
        num_tokens = out.num_scheduled_tokens
        num_rows = sum(max(sr.num_samples, 1) for sr in out.scheduled)
        decode_only = (cfg.backend == "pallas" and
                       all(sr.num_new_tokens == 1 for sr in out.scheduled) and
                       num_rows == len(out.scheduled))
        t = self._bucket(max(num_tokens, num_rows))
        inp = self._empty_inputs(t)
        s = inp["seq_rows"].shape[0]
        assert num_rows <= s and len(out.scheduled) <= s
        smp = {k: np.array(v) for k, v in vars(inp["sampling"]).items()}

        upd = []  # (row, col, block id) entries of the block table that changed
        tok_off = row_i = 0
        any_penalty = any_filter = any_lp = any_random = False
        for i, sr in enumerate(out.scheduled):
            req, n = sr.request, sr.num_new_tokens
            row = self._row(req.request_id)
            ids = sr.block_ids
            mirror = self.host_table[row]
            changed = np.nonzero(mirror[:len(ids)] != ids)[0]
            for c in changed:
                upd.append((row, int(c), ids[c]))
            mirror[:len(ids)] = ids
            start = req.num_computed_tokens
            pos = np.arange(start, start + n)
            inp["input_ids"][tok_off:tok_off + n] = req.all_token_ids[start:start + n]
            inp["positions"][tok_off:tok_off + n] = pos
            blk = np.asarray(ids, np.int32)[pos // bs]
            inp["slot_mapping"][tok_off:tok_off + n] = blk * bs + pos % bs
            inp["seq_rows"][i] = row
            inp["context_lens"][i] = start + n
            inp["query_start_loc"][i + 1] = tok_off + n
            tok_off += n
            sp = req.sampling_params
            for k in range(max(sr.num_samples, 1)):
                r = row_i
                row_i += 1
                inp["logits_indices"][r] = tok_off - 1
                smp["temperature"][r] = sp.temperature
                smp["top_k"][r] = min(sp.top_k, self.model_cfg.vocab_size)
                smp["top_p"][r] = sp.top_p
                smp["min_p"][r] = sp.min_p
                smp["presence_penalty"][r] = sp.presence_penalty
                smp["frequency_penalty"][r] = sp.frequency_penalty
                smp["repetition_penalty"][r] = sp.repetition_penalty
                smp["seeds"][r] = (req.seed & 0xFFFFFFFF, (req.seed >> 32) & 0xFFFFFFFF)
                smp["sample_index"][r] = req.sample_index + k
                smp["output_len"][r] = req.num_output_tokens
                smp["prompt_len"][r] = req.num_prompt_tokens
                smp["token_rows"][r] = row
                if req.num_output_tokens < sp.min_tokens:
                    banned = sorted(sp.all_stop_token_ids)[:MAX_BANNED]
                    smp["banned"][r, :len(banned)] = banned
                penalized = (sp.presence_penalty != 0 or sp.frequency_penalty != 0
                             or sp.repetition_penalty != 1)
                any_penalty |= penalized
                any_filter |= (not sp.greedy) and (sp.top_k > 0 or sp.top_p < 1 or sp.min_p > 0)
                any_random |= not sp.greedy
                any_lp |= sp.logprobs is not None
            if penalized:
                self._sync_tokens(row, req.all_token_ids)
        # Padding sequences repeat the last offset (empty query ranges).
        inp["query_start_loc"][len(out.scheduled) + 1:] = tok_off
        if any_penalty:
            self.token_table = jnp.asarray(self.host_tokens)
        smp["any_penalty"], smp["any_filter"], smp["any_logprobs"], smp["any_random"] = (
            np.bool_(any_penalty), np.bool_(any_filter), np.bool_(any_lp), np.bool_(any_random))
        inp["sampling"] = SamplingMetadata(**smp)

        if len(upd) > len(inp["upd_rows"]):
            self.block_table = jnp.asarray(self.host_table)  # rare: many new blocks at once
        else:
            for j, (r, c, v) in enumerate(upd):
                inp["upd_rows"][j], inp["upd_cols"][j], inp["upd_vals"][j] = r, c, v
        assert len(out.copies) <= len(inp["copy_src"]), "too many copy-on-write copies"
        for j, (a, b) in enumerate(out.copies):
            inp["copy_src"][j], inp["copy_dst"][j] = a, b

        self.kv_caches, self.block_table, res = self._step(
            self.params, self.kv_caches, self.block_table, self.token_table, inp,
            decode_only=decode_only)
        tokens, lp, rank, top_ids, top_lps = jax.device_get(res)

        results, r = [], 0
        for sr in out.scheduled:
            rows = []
            for _ in range(max(sr.num_samples, 1)):
                if sr.num_samples:
                    k = sr.request.sampling_params.logprobs
                    rows.append(SampleResult(
                        int(tokens[r]), float(lp[r]), int(rank[r]),
                        top_ids[r, :k] if k else None, top_lps[r, :k] if k else None))
                r += 1
            results.append(rows)
        return results

    def _sync_tokens(self, row: int, token_ids: list[int]) -> None:
        done = self._token_rows_synced[row]
        self.host_tokens[row, done:len(token_ids)] = token_ids[done:]
        self._token_rows_synced[row] = len(token_ids)

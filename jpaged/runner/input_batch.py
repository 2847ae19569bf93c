"""The persistent batch: per-row host state, and the packed inputs of one step.

Each running request owns a row (of ``max_num_seqs``) from the step it joins
the batch (admission, resume after preemption, or a new ``n > 1`` sibling)
until its blocks go back. Joining writes the row once: its known tokens, its
block-table row and its sampling parameters. After that a step only touches
what changed: new block-table entries (sent to the device as a short update
list) and a few integers per scheduled request. Token ids, positions, slot
mapping and the sampling rows are built with vectorised numpy, with no Python
loop over tokens; a decode token that the host does not know yet (async
scheduling) is written as -1 and taken from the device's last sampled token
of that row inside the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jpaged.runner.step_inputs import StepLayout
from jpaged.sched.output import SchedulerOutput

MAX_BANNED = 16  # token ids a row can ban at once (EOS first, then stop_token_ids)


@dataclass(slots=True)
class BuiltStep:
    """A packed step and how to read its results."""

    layout: StepLayout
    buf: np.ndarray  # [layout.size] int32
    decode_only: bool
    sample_offsets: np.ndarray  # [num_scheduled + 1] first sample row of each request
    block_table_full: bool  # too many block-table changes: upload the whole table
    penalty_rows: list[int]  # rows whose device token history must be re-sent
    # Prompt logprobs: (scheduled index, first step token, first position, count)
    # of each prompt span whose logprobs this step computes.
    plp_spans: list = ()


def prompt_logprob_spans(sched, qsl) -> list[tuple[int, int, int, int]]:
    """``(scheduled index, first step token, first position, count)`` of the
    prompt positions this step computes for requests with ``prompt_logprobs``;
    position ``p`` scores prompt token ``p + 1``, so the last prompt position
    has none."""
    spans = []
    for i, sr in enumerate(sched):
        req = sr.request
        if req.sampling_params.prompt_logprobs is None:
            continue
        cnt = min(sr.start + sr.num_new_tokens, req.num_prompt_tokens - 1) - sr.start
        if cnt > 0:
            spans.append((i, int(qsl[i]), sr.start, cnt))
    return spans


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, max_blocks_per_seq: int,
                 block_size: int, num_blocks: int, vocab_size: int, processors: tuple = (),
                 encoder_decoder: bool = False):
        r = max_num_seqs
        self.max_num_seqs, self.block_size, self.num_blocks = r, block_size, num_blocks
        self.vocab_size = vocab_size
        self.rows: dict[str, int] = {}
        self.free_rows = list(range(r - 1, -1, -1))
        self.tokens = np.zeros((r, max_model_len), np.int32)  # known at join
        self.num_known = np.zeros(r, np.int64)
        self.block_table = np.zeros((r, max_blocks_per_seq), np.int32)  # device mirror
        self.temperature = np.zeros(r, np.float32)
        self.top_k = np.zeros(r, np.int32)
        self.top_p = np.ones(r, np.float32)
        self.min_p = np.zeros(r, np.float32)
        self.presence = np.zeros(r, np.float32)
        self.frequency = np.zeros(r, np.float32)
        self.repetition = np.ones(r, np.float32)
        self.seed = np.zeros((r, 2), np.uint32)
        self.min_tokens = np.zeros(r, np.int64)
        self.banned = np.full((r, MAX_BANNED), vocab_size, np.int32)
        self.penalized = np.zeros(r, bool)
        self.filtered = np.zeros(r, bool)
        self.random = np.zeros(r, bool)
        self.logprobs = np.zeros(r, bool)
        # Logits processors: per-row parameters and whether the row enabled each.
        self.processors = processors
        self.proc_params = [np.zeros((r, p.num_params), np.int32) for p in processors]
        self.proc_on = [np.zeros(r, bool) for _ in processors]
        self.beam = np.zeros(r, bool)  # beam-search rows: the step returns their top tokens
        self.encoder_decoder = encoder_decoder
        self.encoder_len = np.zeros(r, np.int32)  # encoder-decoder models: E of each row

    # ------------------------------------------------------------ rows
    def release(self, req_ids) -> None:
        for rid in req_ids:
            row = self.rows.pop(rid, None)
            if row is not None:
                self.free_rows.append(row)

    def _join(self, sr, eos_ids) -> int:
        req = sr.request
        row = self.rows.get(req.request_id)
        if row is None:
            row = self.rows[req.request_id] = self.free_rows.pop()
        n = req.num_tokens
        self.tokens[row, :n] = req.all_token_ids
        self.num_known[row] = n
        ids = sr.block_ids
        self.block_table[row, :len(ids)] = ids
        self.block_table[row, len(ids):] = 0
        sp = req.sampling_params
        self.temperature[row] = sp.temperature
        self.top_k[row] = min(sp.top_k, self.vocab_size)
        self.top_p[row], self.min_p[row] = sp.top_p, sp.min_p
        self.presence[row], self.frequency[row] = sp.presence_penalty, sp.frequency_penalty
        self.repetition[row] = sp.repetition_penalty
        self.seed[row] = (req.seed & 0xFFFFFFFF, (req.seed >> 32) & 0xFFFFFFFF)
        self.min_tokens[row] = sp.min_tokens
        # EOS first: with many stop_token_ids, min_tokens must still ban EOS.
        eos = sorted(i for i in sp.all_stop_token_ids if i in eos_ids)
        ban = (eos + sorted(set(sp.all_stop_token_ids) - set(eos)))[:MAX_BANNED]
        self.banned[row] = self.vocab_size
        self.banned[row, :len(ban)] = ban
        self.penalized[row] = (sp.presence_penalty != 0 or sp.frequency_penalty != 0
                               or sp.repetition_penalty != 1)
        self.random[row] = not sp.greedy
        self.filtered[row] = (not sp.greedy) and (sp.top_k > 0 or sp.top_p < 1 or sp.min_p > 0)
        self.logprobs[row] = sp.logprobs is not None
        rows = sp.processor_rows  # packed by the engine at add_request
        for p, params, on in zip(self.processors, self.proc_params, self.proc_on):
            on[row] = p.name in rows
            if on[row]:
                params[row] = rows[p.name]
        self.beam[row] = req.beam is not None
        self.encoder_len[row] = req.encoder_len
        if req.beam is not None:  # its tokens come from the top-k, never from a draw
            self.random[row] = self.filtered[row] = self.logprobs[row] = False
        return row

    def history(self, row: int) -> np.ndarray:
        """The row's token history for penalties: its known tokens, with an
        encoder-decoder row's encoder blocks out of the vocabulary (ignored)."""
        if not self.encoder_len[row]:
            return self.tokens[row]
        bs = self.block_size
        out = self.tokens[row].copy()
        out[:-(-int(self.encoder_len[row]) // bs) * bs] = self.vocab_size
        return out

    # ------------------------------------------------------------ a step
    def build(self, out: SchedulerOutput, bucket_fn, eos_ids, pallas: bool) -> BuiltStep:
        """Pack the inputs of ``out`` (whose requests' blocks are allocated)."""
        sched = out.scheduled
        n = len(sched)
        rows = np.empty(n, np.int64)
        starts = np.empty(n, np.int64)
        num_new = np.empty(n, np.int64)
        num_rows = np.empty(n, np.int64)  # sample rows per request (>= 1)
        out_len = np.empty(n, np.int64)
        prompt_len = np.empty(n, np.int64)
        sample_base = np.empty(n, np.int64)
        upd_r, upd_c, upd_v = [], [], []
        penalty_rows = []
        for i, sr in enumerate(sched):
            req = sr.request
            if sr.joined:
                row = self._join(sr, eos_ids)
                if self.penalized[row]:
                    penalty_rows.append(row)
            else:
                row = self.rows[req.request_id]
                if req.beam is not None:
                    # A beam's next token is the host's choice, not the row's
                    # last sampled one: write it (one token a step).
                    k, m = int(self.num_known[row]), req.num_tokens
                    self.tokens[row, k:m] = req.all_token_ids[k:m]
                    self.num_known[row] = m
                if sr.block_ids:
                    k = len(sr.block_ids)
                    self.block_table[row, sr.block_offset:sr.block_offset + k] = sr.block_ids
            if sr.block_ids:
                k = len(sr.block_ids)
                upd_r += [row] * k
                upd_c += range(sr.block_offset, sr.block_offset + k)
                upd_v += sr.block_ids
            rows[i], starts[i], num_new[i] = row, sr.start, sr.num_new_tokens
            num_rows[i] = max(sr.num_samples, 1)
            # Tokens generated before this step's sample (the in-flight ones included).
            out_len[i] = req.num_output_tokens + req.num_output_placeholders - (
                1 if sr.num_samples else 0)
            prompt_len[i] = req.num_prompt_tokens
            sample_base[i] = req.sample_index

        qsl = np.zeros(n + 1, np.int64)
        np.cumsum(num_new, out=qsl[1:])
        total = int(qsl[-1])
        soff = np.zeros(n + 1, np.int64)
        np.cumsum(num_rows, out=soff[1:])
        total_rows = int(soff[-1])
        t = bucket_fn(max(total, total_rows))
        s = min(t, self.max_num_seqs)
        assert total_rows <= s and n <= s
        plp_spans = prompt_logprob_spans(sched, qsl)
        layout = StepLayout(t, s, t + s, s, MAX_BANNED, self.processors,
                            prompt_logprobs=bool(plp_spans),
                            encoder_decoder=self.encoder_decoder)
        buf = np.zeros(layout.size, np.int32)
        v = layout.views(buf)
        decode_only = pallas and bool((num_new == 1).all()) and total_rows == n

        # Tokens.
        tok_req = np.repeat(np.arange(n), num_new)
        positions = starts[tok_req] + (np.arange(total) - qsl[tok_req])
        tok_rows = rows[tok_req]
        ids = self.tokens[tok_rows, positions]
        ids[positions >= self.num_known[tok_rows]] = -1  # on the device
        v["input_ids"][:total] = ids
        v["positions"][:total] = positions
        bs = self.block_size
        v["slot_mapping"][:total] = self.block_table[tok_rows, positions // bs] * bs + positions % bs
        v["slot_mapping"][total:] = self.num_blocks * bs
        v["token_rows"][:total] = tok_rows
        v["token_rows"][total:] = self.max_num_seqs
        # Sequences.
        v["seq_rows"][:n] = rows
        if self.encoder_decoder:
            v["encoder_lens"][:n] = self.encoder_len[rows]
        v["context_lens"][:n] = starts + num_new
        v["query_start_loc"][:n + 1] = qsl
        v["query_start_loc"][n + 1:] = total  # padding sequences: empty query ranges
        # Block-table updates and copy-on-write.
        full = False
        if len(upd_r) > layout.num_updates:
            full = True  # rare: many new blocks at once
            upd_r = upd_c = upd_v = []
        u = len(upd_r)
        v["upd_rows"][:u], v["upd_cols"][:u], v["upd_vals"][:u] = upd_r, upd_c, upd_v
        v["upd_rows"][u:] = self.max_num_seqs
        assert len(out.copies) <= layout.num_copies, "too many copy-on-write copies"
        for j, (a, b) in enumerate(out.copies):
            v["copy_src"][j], v["copy_dst"][j] = a, b
        v["copy_dst"][len(out.copies):] = self.num_blocks
        # Sample rows: one per request (its last scheduled token), n on the
        # last prefill chunk of an n > 1 prompt.
        srow_req = np.repeat(np.arange(n), num_rows)
        k = np.arange(total_rows) - soff[srow_req]
        r = rows[srow_req]
        v["logits_indices"][:total_rows] = qsl[srow_req + 1] - 1
        v["temperature"][:total_rows] = self.temperature[r]
        v["top_k"][:total_rows] = self.top_k[r]
        v["top_p"][:total_rows] = self.top_p[r]
        v["top_p"][total_rows:] = 1
        v["min_p"][:total_rows] = self.min_p[r]
        v["presence_penalty"][:total_rows] = self.presence[r]
        v["frequency_penalty"][:total_rows] = self.frequency[r]
        v["repetition_penalty"][:total_rows] = self.repetition[r]
        v["repetition_penalty"][total_rows:] = 1
        seeds = self.seed[r].view(np.int32)
        v["seed_lo"][:total_rows], v["seed_hi"][:total_rows] = seeds[:, 0], seeds[:, 1]
        v["sample_index"][:total_rows] = sample_base[srow_req] + k
        ol = out_len[srow_req]
        v["output_len"][:total_rows] = ol
        v["prompt_len"][:total_rows] = prompt_len[srow_req]
        # Mid-prefill rows sample nothing: they must not overwrite the row's last token.
        sampling = np.repeat(np.array([sr.num_samples > 0 for sr in sched], bool), num_rows)
        v["sample_token_rows"][:total_rows] = np.where(sampling, r, self.max_num_seqs)
        v["sample_token_rows"][total_rows:] = self.max_num_seqs
        v["banned"][:] = self.vocab_size
        ban = ol < self.min_tokens[r]
        v["banned"][:total_rows][ban] = self.banned[r[ban]]
        v["flags"][:] = (self.penalized[r].any(), self.filtered[r].any(), self.logprobs[r].any(),
                         self.random[r].any(), self.beam[r].any())
        for p, params, on in zip(self.processors, self.proc_params, self.proc_on):
            v[f"lp.{p.name}"][:total_rows] = params[r]
            v[f"lpon.{p.name}"][:total_rows] = on[r]
        if plp_spans:
            targets = v["plp_targets"]
            targets[:] = -1
            for i, a, pos, cnt in plp_spans:
                targets[a:a + cnt] = sched[i].request.prompt_token_ids[pos + 1:pos + 1 + cnt]
        return BuiltStep(layout, buf, decode_only, soff, full, penalty_rows, plp_spans)

"""One packed int32 buffer per step, and the typed view of it inside the step.

The host writes every per-step input (token ids, positions, slot mapping,
sequence metadata, block-table updates, copy-on-write pairs and sampling
parameters; float32 fields as their bit patterns) into one int32 array, so
each step costs one host-to-device transfer. `StepLayout` is static (part of
the compile key): its sizes fix the offset of every field, and `unpack`
slices the buffer back into a `StepInputs` pytree inside the jitted step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.sample.sampler import SamplingMetadata

NUM_FLAGS = 5  # any_penalty, any_filter, any_logprobs, any_random, any_beam
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInputs:
    """Per-step device inputs, padded to the step's bucket (T tokens, S rows)."""

    input_ids: jax.Array  # [T] i32; -1: the row's last sampled token (on the device)
    positions: jax.Array  # [T] i32
    slot_mapping: jax.Array  # [T] i32, out of range for padding tokens
    token_rows: jax.Array  # [T] i32 persistent batch row of each token; R pads
    seq_rows: jax.Array  # [S] i32 batch row of each scheduled sequence
    context_lens: jax.Array  # [S] i32, including this step's tokens; 0 pads
    query_start_loc: jax.Array  # [S + 1] i32
    logits_indices: jax.Array  # [S] i32 token whose logits each sample row reads
    upd_rows: jax.Array  # [U] i32 block-table updates (row, col, value); R pads
    upd_cols: jax.Array  # [U] i32
    upd_vals: jax.Array  # [U] i32
    copy_src: jax.Array  # [C] i32 copy-on-write source blocks
    copy_dst: jax.Array  # [C] i32 destinations; num_blocks pads
    sampling: SamplingMetadata
    # Per logits processor of the layout: (params [S, n] i32, active [S] bool).
    processors: tuple = ()
    # Layouts with prompt logprobs: per token, the next prompt token (whose
    # logprob that position's logits give), -1 where none is asked.
    plp_targets: jax.Array | None = None
    # Encoder-decoder models only: each sequence's encoder length [S] i32.
    encoder_lens: jax.Array | None = None


@dataclass(frozen=True)
class StepLayout:
    """Sizes of the packed buffer's sections (static)."""

    num_tokens: int  # T
    num_seqs: int  # S
    num_updates: int  # U
    num_copies: int  # C
    num_banned: int  # B, banned ids per sample row
    # Registered logits processors (jpaged.sample.logits_processors): each adds
    # S x num_params words of row parameters and S words of "enabled" flags.
    processors: tuple = ()
    # Some request of the step asks for prompt logprobs: every token's logits
    # are scored against ``plp_targets`` (a separate compiled variant).
    prompt_logprobs: bool = False
    encoder_decoder: bool = False  # adds encoder_lens (S words)

    def fields(self) -> list[tuple[str, int]]:
        t, s, u, c, b = (self.num_tokens, self.num_seqs, self.num_updates, self.num_copies,
                         self.num_banned)
        return [
            ("input_ids", t), ("positions", t), ("slot_mapping", t), ("token_rows", t),
            ("seq_rows", s), ("context_lens", s), ("query_start_loc", s + 1),
            ("logits_indices", s), ("upd_rows", u), ("upd_cols", u), ("upd_vals", u),
            ("copy_src", c), ("copy_dst", c),
            *[(f, s) for f in _FLOAT_FIELDS],
            ("top_k", s), ("seed_lo", s), ("seed_hi", s), ("sample_index", s),
            ("output_len", s), ("prompt_len", s), ("sample_token_rows", s), ("banned", s * b),
            ("flags", NUM_FLAGS),
            *[f for p in self.processors
              for f in ((f"lp.{p.name}", s * p.num_params), (f"lpon.{p.name}", s))],
            *([("plp_targets", t)] if self.prompt_logprobs else []),
            *([("encoder_lens", s)] if self.encoder_decoder else []),
        ]

    @property
    def size(self) -> int:
        return sum(n for _, n in self.fields())

    def views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        """Named numpy views into a host buffer of `size` int32 (floats as float32 views)."""
        out, off = {}, 0
        for name, n in self.fields():
            v = buf[off:off + n]
            out[name] = v.view(np.float32) if name in _FLOAT_FIELDS else v
            off += n
        out["banned"] = out["banned"].reshape(self.num_seqs, self.num_banned)
        for p in self.processors:
            out[f"lp.{p.name}"] = out[f"lp.{p.name}"].reshape(self.num_seqs, p.num_params)
        return out

    def unpack(self, buf: jax.Array) -> StepInputs:
        """Inside jit: slice the packed device buffer into `StepInputs`."""
        f, off = {}, 0
        for name, n in self.fields():
            v = buf[off:off + n]
            f[name] = jax.lax.bitcast_convert_type(v, jnp.float32) if name in _FLOAT_FIELDS \
                else v
            off += n
        flags = f["flags"] != 0
        seeds = jnp.stack([f["seed_lo"], f["seed_hi"]], axis=1)
        smd = SamplingMetadata(
            temperature=f["temperature"], top_k=f["top_k"], top_p=f["top_p"], min_p=f["min_p"],
            presence_penalty=f["presence_penalty"], frequency_penalty=f["frequency_penalty"],
            repetition_penalty=f["repetition_penalty"],
            seeds=jax.lax.bitcast_convert_type(seeds, jnp.uint32),
            sample_index=f["sample_index"], output_len=f["output_len"],
            prompt_len=f["prompt_len"], token_rows=f["sample_token_rows"],
            banned=f["banned"].reshape(self.num_seqs, self.num_banned),
            any_penalty=flags[0], any_filter=flags[1], any_logprobs=flags[2],
            any_random=flags[3], any_beam=flags[4])
        procs = tuple((f[f"lp.{p.name}"].reshape(self.num_seqs, p.num_params),
                       f[f"lpon.{p.name}"] != 0) for p in self.processors)
        names = {fl.name for fl in dataclasses.fields(StepInputs)} - {"sampling", "processors"}
        return StepInputs(sampling=smd, processors=procs, **{k: f.get(k) for k in names})

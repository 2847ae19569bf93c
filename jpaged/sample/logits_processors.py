"""Logits processors that run inside the jitted step, vectorised over its rows.

A processor is an object with:

``name: str``
    Requests enable it by this name: ``SamplingParams(logits_processors=
    {name: argument})`` (the built-ins by their own SamplingParams fields).
``num_params: int``
    int32 words of per-row parameters. They travel in the step's packed
    buffer, so keep them small (floats go as bit patterns: `pack_f32`).
``row_params(self, arg, vocab_size: int) -> np.ndarray``
    On the host, once per request: check ``arg`` (raise ValueError naming
    it) and return its ``[num_params]`` int32 row.
``apply(self, logits, params, active, ctx) -> logits``
    Inside jit: ``logits [S, V] f32``, ``params [S, num_params] i32``,
    ``active [S] bool`` (rows that enabled it; it must leave the others
    alone) and `ProcessorContext` (each row's token history). Pure jnp, no
    host callbacks or Python branches on values; it runs behind ``lax.cond``
    so steps where no row enables it skip it.

Processors are registered at engine start (`LLM(logits_processors=[...])`,
instances, classes, ``module:Class`` names, or entry points of group
``jpaged.logits_processors``); `register` traces ``apply`` once with
abstract shapes and refuses one that does not trace. They run after the
penalties and ``min_tokens`` bans, before temperature and top-k/p.
Built in: ``logit_bias`` (OpenAI), ``allowed_token_ids`` and ``bad_words``
(vLLM), limited to the sizes below per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGIT_BIAS = 64  # entries of logit_bias per request
MAX_ALLOWED = 128  # allowed_token_ids per request
MAX_BAD_WORDS, MAX_BAD_WORD_LEN = 16, 8  # token sequences, tokens each


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ProcessorContext:
    token_table: jax.Array  # [R, max_model_len] i32 token history of each batch row
    token_rows: jax.Array  # [S] i32 row of each sample row (R: none)
    seq_len: jax.Array  # [S] i32 tokens so far (prompt + output), before this sample


def pack_f32(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.int32)


def unpack_f32(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.float32)


def _token_ids(name, ids, vocab_size, limit) -> list[int]:
    ids = list(ids)
    if len(ids) > limit:
        raise ValueError(f"{name} has {len(ids)} entries; at most {limit} are supported")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) \
                or not 0 <= t < vocab_size:
            raise ValueError(f"{name}: token id {t!r} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]


class LogitBias:
    """OpenAI ``logit_bias``: add a bias to chosen token ids."""

    name = "logit_bias"
    num_params = 2 * MAX_LOGIT_BIAS

    def row_params(self, arg, vocab_size):
        if not isinstance(arg, dict):
            raise ValueError(f"logit_bias={arg!r} must map token ids to biases")
        ids = _token_ids("logit_bias", [int(k) if isinstance(k, str) and k.lstrip("-").isdigit()
                                        else k for k in arg], vocab_size, MAX_LOGIT_BIAS)
        bias = []
        for v in arg.values():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise ValueError(f"logit_bias value {v!r} must be a number in [-100, 100]")
            bias.append(float(v))
        row = np.full(self.num_params, -1, np.int32)
        row[:len(ids)] = ids
        row[MAX_LOGIT_BIAS:MAX_LOGIT_BIAS + len(ids)] = pack_f32(bias)
        return row

    def apply(self, logits, params, active, ctx):
        ids = params[:, :MAX_LOGIT_BIAS]
        bias = unpack_f32(params[:, MAX_LOGIT_BIAS:])
        vocab = logits.shape[1]
        ids = jnp.where(active[:, None] & (ids >= 0), ids, vocab)
        rows = jnp.arange(logits.shape[0])[:, None]
        return logits.at[rows, ids].add(bias, mode="drop")


class AllowedTokenIds:
    """vLLM ``allowed_token_ids``: every other token gets -inf."""

    name = "allowed_token_ids"
    num_params = MAX_ALLOWED

    def row_params(self, arg, vocab_size):
        ids = _token_ids("allowed_token_ids", arg, vocab_size, MAX_ALLOWED)
        if not ids:
            raise ValueError("allowed_token_ids is empty")
        row = np.full(self.num_params, -1, np.int32)
        row[:len(ids)] = ids
        return row

    def apply(self, logits, params, active, ctx):
        num_rows, vocab = logits.shape
        rows = jnp.arange(num_rows)[:, None]
        allowed = jnp.zeros((num_rows, vocab), jnp.bool_).at[
            rows, jnp.where(params >= 0, params, vocab)].set(True, mode="drop")
        return jnp.where(active[:, None] & ~allowed, -jnp.inf, logits)


class BadWords:
    """vLLM ``bad_words``: a word's last token is banned when the tokens
    generated just before match the rest of it (a one-token word always).
    The argument is a list of token-id sequences (the engine tokenizes the
    strings of ``SamplingParams.bad_words``, with and without a leading space)."""

    name = "bad_words"
    num_params = MAX_BAD_WORDS * (MAX_BAD_WORD_LEN + 1)

    def row_params(self, arg, vocab_size):
        words = [list(w) for w in arg]
        if len(words) > MAX_BAD_WORDS:
            raise ValueError(f"bad_words has {len(words)} token sequences; at most "
                             f"{MAX_BAD_WORDS} are supported")
        row = np.full(self.num_params, -1, np.int32)
        lens = row[MAX_BAD_WORDS * MAX_BAD_WORD_LEN:]
        lens[:] = 0
        for i, w in enumerate(words):
            w = _token_ids("bad_words", w, vocab_size, MAX_BAD_WORD_LEN)
            if not w:
                raise ValueError("bad_words contains an empty word")
            row[i * MAX_BAD_WORD_LEN:i * MAX_BAD_WORD_LEN + len(w)] = w
            lens[i] = len(w)
        return row

    def apply(self, logits, params, active, ctx):
        num_rows, vocab = logits.shape
        w, ln = MAX_BAD_WORDS, MAX_BAD_WORD_LEN
        words = params[:, :w * ln].reshape(num_rows, w, ln)
        lens = params[:, w * ln:]  # [S, W]
        # The last ln - 1 tokens of each row (-1 before the sequence starts).
        pos = ctx.seq_len[:, None] - (ln - 1) + jnp.arange(ln - 1)[None, :]  # [S, ln-1]
        hist_rows = jnp.minimum(ctx.token_rows, ctx.token_table.shape[0] - 1)
        tail = ctx.token_table[hist_rows[:, None], jnp.maximum(pos, 0)]
        tail = jnp.where(pos >= 0, tail, -1)
        # Prefix token j of a word of length n sits at tail index ln - n + j.
        j = jnp.arange(ln - 1)[None, None, :]
        idx = jnp.clip(ln - lens[:, :, None] + j, 0, ln - 2)  # [S, W, ln-1]
        seen = jnp.take_along_axis(tail[:, None, :].repeat(w, 1), idx, axis=2)
        match = jnp.all((words[:, :, :ln - 1] == seen) | (j >= lens[:, :, None] - 1), axis=2)
        last = jnp.take_along_axis(words, jnp.maximum(lens - 1, 0)[:, :, None], axis=2)[..., 0]
        ban = active[:, None] & (lens > 0) & match
        rows = jnp.arange(num_rows)[:, None]
        return logits.at[rows, jnp.where(ban, last, vocab)].set(-jnp.inf, mode="drop")


BUILTIN = (LogitBias, AllowedTokenIds, BadWords)


def check_processor(proc, vocab_size: int = 64) -> None:
    """Refuse (ValueError) a processor that lacks the interface or whose
    ``apply`` does not trace under jit with abstract inputs."""
    name = getattr(proc, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"logits processor {proc!r} has no 'name' string")
    n = getattr(proc, "num_params", None)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"logits processor {name!r}: num_params={n!r} must be an integer >= 0")
    for m in ("row_params", "apply"):
        if not callable(getattr(proc, m, None)):
            raise ValueError(f"logits processor {name!r} has no {m}() method")
    s = 2
    args = (jax.ShapeDtypeStruct((s, vocab_size), jnp.float32),
            jax.ShapeDtypeStruct((s, n), jnp.int32), jax.ShapeDtypeStruct((s,), jnp.bool_),
            ProcessorContext(jax.ShapeDtypeStruct((s, 16), jnp.int32),
                             jax.ShapeDtypeStruct((s,), jnp.int32),
                             jax.ShapeDtypeStruct((s,), jnp.int32)))
    try:
        out = jax.eval_shape(proc.apply, *args)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not jittable"
        raise ValueError(f"logits processor {name!r} is not jittable: its apply() failed to "
                         f"trace with abstract inputs ({type(e).__name__}: {e})") from e
    if getattr(out, "shape", None) != (s, vocab_size) or \
            not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"logits processor {name!r}: apply() must return float logits of the "
                         f"input's shape {(s, vocab_size)}, got {out!r}")


def resolve_processors(specs, vocab_size: int) -> tuple:
    """The built-ins and the user's processors (instances, classes, ``module:Class``
    or entry point names), each checked; names must be unique."""
    from jpaged.plugins import load_plugin

    procs = [cls() for cls in BUILTIN]
    for spec in specs or ():
        obj = load_plugin("jpaged.logits_processors", spec, "logits_processors") \
            if isinstance(spec, str) else spec
        if isinstance(obj, type):
            obj = obj()
        check_processor(obj, vocab_size)
        procs.append(obj)
    names = [p.name for p in procs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"logits processor name(s) {', '.join(sorted(dup))} registered twice")
    return tuple(procs)


def apply_processors(logits, processors, inputs, ctx: ProcessorContext):
    """Each processor over the rows that enabled it; skipped when none did."""
    for proc, (params, active) in zip(processors, inputs):
        logits = jax.lax.cond(jnp.any(active),
                              lambda x, p=proc, a=params, b=active: p.apply(x, a, b, ctx)
                              .astype(x.dtype),
                              lambda x: x, logits)
    return logits

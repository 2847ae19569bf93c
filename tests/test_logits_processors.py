"""Logits processors and plugins: the built-ins against numpy oracles, then
through the engine; a user processor and a user scheduling policy loaded
from entry points of a temporary distribution; a processor that does not
trace under jit is refused at registration."""

import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.sample.logits_processors import (MAX_BAD_WORD_LEN, AllowedTokenIds, BadWords,
                                             LogitBias, ProcessorContext, check_processor,
                                             resolve_processors)

V = 50


def run(proc, logits, args, ctx=None):
    """Apply ``proc`` with row i enabled by ``args[i]`` (None: disabled)."""
    params = np.stack([proc.row_params(a, V) if a is not None
                       else np.zeros(proc.num_params, np.int32) for a in args])
    active = np.array([a is not None for a in args])
    if ctx is None:
        ctx = ProcessorContext(jnp.zeros((len(args), 4), jnp.int32),
                               jnp.arange(len(args), dtype=jnp.int32),
                               jnp.zeros(len(args), jnp.int32))
    return np.asarray(proc.apply(jnp.asarray(logits), jnp.asarray(params),
                                 jnp.asarray(active), ctx))


def test_logit_bias_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, V)).astype(np.float32)
    args = [{3: 5.0, "7": -100, 49: 0.5}, None, {0: 100}]
    want = logits.copy()
    for i, a in enumerate(args):
        for k, b in (a or {}).items():
            want[i, int(k)] += b
    np.testing.assert_allclose(run(LogitBias(), logits, args), want, rtol=1e-6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LogitBias().row_params({V: 1.0}, V)
    with pytest.raises(ValueError, match=r"\[-100, 100\]"):
        LogitBias().row_params({1: 101}, V)


def test_allowed_token_ids_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, V)).astype(np.float32)
    want = logits.copy()
    mask = np.ones(V, bool)
    mask[[4, 8, 15]] = False
    want[0, mask] = -np.inf
    np.testing.assert_array_equal(run(AllowedTokenIds(), logits, [[4, 8, 15], None]), want)


def test_bad_words_matches_numpy():
    rng = np.random.default_rng(2)
    hist = rng.integers(0, V, (3, 12)).astype(np.int32)
    seq_len = np.array([12, 5, 1], np.int32)
    hist[0, 10:12] = [21, 22]  # row 0 ends with 21 22
    hist[1, 3:5] = [21, 30]
    words = [[9], [21, 22, 23], [22, 24], [30, 31], [1, 2, 3, 4, 5, 6, 7, 8]]
    logits = rng.normal(size=(3, V)).astype(np.float32)

    def oracle(i):
        out = logits[i].copy()
        seq = hist[i, :seq_len[i]].tolist()
        for w in words:
            if len(w) == 1 or (len(seq) >= len(w) - 1 and seq[len(seq) - len(w) + 1:] == w[:-1]):
                out[w[-1]] = -np.inf
        return out

    ctx = ProcessorContext(jnp.asarray(hist), jnp.arange(3, dtype=jnp.int32),
                           jnp.asarray(seq_len))
    got = run(BadWords(), logits, [words] * 3, ctx)
    for i in range(3):
        np.testing.assert_array_equal(got[i], oracle(i))
    assert np.isneginf(got[0, 23]) and np.isneginf(got[1, 31]) and not np.isneginf(got[0, 31])
    with pytest.raises(ValueError, match="at most"):
        BadWords().row_params([[1] * (MAX_BAD_WORD_LEN + 1)], V)


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128,
               compile_all_buckets=False)


def greedy(llm, prompts, **kw):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                **kw), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_builtins_through_the_engine(llm):
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    base = greedy(llm, prompts)
    assert greedy(llm, prompts, logit_bias={123: 100}) == [[123] * 8] * 2
    got = greedy(llm, prompts, allowed_token_ids=[40, 41, 42])
    assert all(set(g) <= {40, 41, 42} for g in got)
    # Ban the baseline's first token: the output changes there, and never has it.
    first = base[0][0]
    text = llm.get_tokenizer().decode([first])
    got = greedy(llm, [prompts[0]], bad_words=[text.strip() or text])
    assert got[0][0] != first
    # Rows without processors in the same batch are untouched.
    mixed = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                   SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                  logit_bias={7: 100})], use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == base[0]
    assert mixed[1].outputs[0].token_ids == [7] * 8
    with pytest.raises(ValueError, match="not registered"):
        greedy(llm, prompts, logits_processors={"nope": 1})


PLUGIN = textwrap.dedent('''
    import jax.numpy as jnp
    import numpy as np

    class ForceToken:
        """Forces the token id given per request."""
        name = "force"
        num_params = 1

        def row_params(self, arg, vocab_size):
            if not 0 <= int(arg) < vocab_size:
                raise ValueError(f"force={arg!r} is outside the vocabulary")
            return np.array([arg], np.int32)

        def apply(self, logits, params, active, ctx):
            hit = jnp.arange(logits.shape[1])[None, :] == params[:, :1]
            return jnp.where(active[:, None] & ~hit, -jnp.inf, logits)

    class NotJittable(ForceToken):
        name = "nojit"

        def apply(self, logits, params, active, ctx):
            return logits * float(np.asarray(params).sum())

    class NewestFirst:
        def __init__(self, estimator):
            self.estimator = estimator

        def next_waiting(self, waiting, now):
            return max(waiting, key=lambda r: r.arrival_time)

        def victim(self, candidates, now):
            return candidates[0]

        def refuse(self, req, now):
            return "no odd ids" if req.request_id.endswith("odd") else None
''')


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """A module and an installed-looking distribution declaring entry points."""
    (tmp_path / "jp_plugin_mod.py").write_text(PLUGIN)
    info = tmp_path / "jp_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jp-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[jpaged.logits_processors]\nforce = jp_plugin_mod:ForceToken\n"
        "nojit = jp_plugin_mod:NotJittable\n\n"
        "[jpaged.scheduling_policies]\nnewest = jp_plugin_mod:NewestFirst\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("jp_plugin_mod", None)


def test_custom_processor_by_entry_point(plugin_dist, llama_dir):
    llm = LLM(llama_dir, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=128,
              compile_all_buckets=False, logits_processors=["force"])
    outs = llm.generate([[5, 6, 7], [8, 9]], [
        SamplingParams(temperature=0.8, seed=1, max_tokens=5, ignore_eos=True,
                       logits_processors={"force": 77}),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == [77] * 5
    assert outs[1].outputs[0].token_ids != [77] * 5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5]], SamplingParams(logits_processors={"force": 10**6}), use_tqdm=False)


def test_non_jittable_processor_is_refused(plugin_dist):
    with pytest.raises(ValueError, match="'nojit' is not jittable"):
        resolve_processors(["nojit"], V)
    with pytest.raises(ValueError, match="entry point"):
        resolve_processors(["missing"], V)
    import jp_plugin_mod

    check_processor(jp_plugin_mod.ForceToken(), V)  # the good one passes
    with pytest.raises(ValueError, match="registered twice"):
        resolve_processors([jp_plugin_mod.ForceToken, "jp_plugin_mod:ForceToken"], V)


def test_custom_policy_by_entry_point_and_module_name(plugin_dist):
    from jpaged.cache import KVCacheManager
    from jpaged.sched import Request, RequestRefused, Scheduler, SchedulerConfig

    for name in ("newest", "jp_plugin_mod:NewestFirst"):
        s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64,
                                      max_model_len=64, scheduling_policy=name),
                      KVCacheManager(16, 4, True))
        for i, rid in enumerate(["a", "b", "c"]):
            s.add_request(Request(rid, rid, [1, 2, 3], SamplingParams(max_tokens=2), i, 0,
                                  max_tokens=2))
        with pytest.raises(RequestRefused, match="no odd ids"):
            s.add_request(Request("odd", "odd", [1], SamplingParams(max_tokens=2), 9, 0,
                                  max_tokens=2))
        assert [sr.request.request_id for sr in s.schedule().scheduled] == ["c"]
    with pytest.raises(ValueError, match="scheduling_policy='nope'"):
        SchedulerConfig(scheduling_policy="nope")
    with pytest.raises(ValueError, match="lacks next_waiting"):
        SchedulerConfig(scheduling_policy="jp_plugin_mod:ForceToken")

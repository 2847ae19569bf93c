"""``jpaged generate --plot``: the per-step recorder against the engine's own
counters, the image it draws, the command line end to end, and the error
without matplotlib."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.cli.plot import StepRecorder, plot_run, require_matplotlib, throughput


def test_recorder_follows_the_engine_and_plots(llama_dir, tmp_path):
    llm = LLM(llama_dir, block_size=8, num_kv_blocks=40, max_num_seqs=4,
              max_num_batched_tokens=64, max_model_len=256)
    engine = llm.llm_engine
    rec = StepRecorder()
    rec(engine)
    steps = []
    prompts = [[5 + i, 6, 7, 8, 9] * 6 for i in range(6)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True),
                        use_tqdm=False, on_step=lambda e: (rec(e), steps.append(e.num_steps)))
    c = rec.columns()
    assert len(c["t"]) == len(steps) + 1 and steps == sorted(set(steps))
    assert rec.num_blocks == 39
    assert c["in_use"].max() > 20 and c["in_use"][-1] == 0  # freed at the end
    assert c["running"].max() == 4 and c["waiting"].max() >= 2
    assert c["running"][-1] == c["waiting"][-1] == 0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert c["generated"][-1] - c["generated"][0] == n_out == 6 * 40
    centres, rates = throughput(c["t"], c["generated"])
    widths = np.diff(np.linspace(0, c["t"][-1], len(centres) + 1))
    assert np.isclose((rates * widths).sum(), n_out)
    out = tmp_path / "run.png"
    plot_run(rec, str(out))
    img = require_matplotlib().imread(str(out))
    assert img.shape[0] > 500 and img.shape[1] > 700
    assert img[..., :3].std() > 0.05  # something is drawn


def test_generate_plot_flag(tmp_path, llama_dir):
    out = tmp_path / "kv.png"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jpaged.cli", "generate", "--model", llama_dir,
         "--prompt", "Hello there", "--prompt", "Once upon a time", "--max-tokens", "24",
         "--max-num-seqs", "2", "--max-num-batched-tokens", "64", "--max-model-len", "256",
         "--plot", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"plot: {out}" in proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match=r"jpaged\[plot\]"):
        require_matplotlib()

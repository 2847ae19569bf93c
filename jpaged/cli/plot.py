"""``jpaged generate --plot FILE.png``: the run's KV cache and throughput over time.

`StepRecorder` is called once before the run and after every engine step
(`LLM.generate`'s ``on_step``) and keeps one row of counters the engine keeps anyway: the
time, KV blocks in use, free blocks that keep a prefix hash, output tokens
so far, running and waiting requests. `plot_run` draws them with matplotlib
(the optional ``plot`` extra, checked before the run starts by
`require_matplotlib`): KV usage per step, output tokens per second in time
bins, and the queue lengths.
"""

from __future__ import annotations

import time

import numpy as np

_FIELDS = ("t", "in_use", "cached_free", "generated", "running", "waiting")


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or a ValueError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'jpaged[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class StepRecorder:
    """Per-step counters of one engine (see the module docstring)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.rows: list[tuple] = []
        self.num_blocks = 0

    def __call__(self, engine) -> None:
        kv, sched = engine.kv, engine.scheduler
        self.num_blocks = kv.num_blocks - 1
        self.rows.append((self.clock(), self.num_blocks - kv.num_free_blocks,
                          kv.pool.get_num_cached_free_blocks(),
                          engine.generation_tokens_total, len(sched.running),
                          len(sched.waiting)))

    def columns(self) -> dict[str, np.ndarray]:
        a = np.asarray(self.rows, float).reshape(-1, len(_FIELDS))
        cols = dict(zip(_FIELDS, a.T))
        if len(a):
            cols["t"] = cols["t"] - cols["t"][0]
        return cols


def throughput(t: np.ndarray, generated: np.ndarray, bins: int = 60):
    """Output tokens per second in up to ``bins`` equal time bins: (centres, rates)."""
    if len(t) < 2 or t[-1] <= 0:
        return np.zeros(0), np.zeros(0)
    edges = np.linspace(0.0, t[-1], min(bins, len(t) - 1) + 1)
    new = np.diff(generated, prepend=generated[0])  # tokens read back by each step
    counts, _ = np.histogram(t, edges, weights=new)
    return (edges[:-1] + edges[1:]) / 2, counts / np.diff(edges)


def plot_run(rec: StepRecorder, path: str, title: str = "jpaged generate") -> None:
    """Draw the recorded run to ``path`` (any format matplotlib knows by extension)."""
    plt = require_matplotlib()
    c = rec.columns()
    if not len(c["t"]):
        raise ValueError("--plot: the run recorded no engine step")
    fig, (kv, tp, q) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True,
                                    gridspec_kw={"height_ratios": [3, 2, 1.4]})
    n = max(rec.num_blocks, 1)
    kv.step(c["t"], 100 * c["in_use"] / n, where="post", color="#1f77b4",
            label="blocks in use")
    kv.step(c["t"], 100 * c["cached_free"] / n, where="post", color="#2f7d8c", linestyle="--",
            label="free, prefix kept for reuse")
    kv.set_ylabel(f"% of {rec.num_blocks} KV blocks")
    kv.set_ylim(0, 105)
    kv.legend(loc="upper right", fontsize=8)
    kv.grid(alpha=0.3)
    centres, rates = throughput(c["t"], c["generated"])
    tp.plot(centres, rates, color="#d62728", drawstyle="steps-mid")
    tp.set_ylabel("output tokens/s")
    tp.grid(alpha=0.3)
    q.step(c["t"], c["running"], where="post", label="running")
    q.step(c["t"], c["waiting"], where="post", label="waiting")
    q.set_ylabel("requests")
    q.set_xlabel("seconds since the first step")
    q.legend(loc="upper right", fontsize=8)
    q.grid(alpha=0.3)
    total = c["generated"][-1]
    fig.suptitle(f"{title}: {len(c['t']) - 1} steps, {int(total)} output tokens in "
                 f"{c['t'][-1]:.2f} s, peak KV usage {100 * c['in_use'].max() / n:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

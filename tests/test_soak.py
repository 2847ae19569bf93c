"""The short soak (scripts/soak.py against `jpaged serve` in a subprocess on
127.0.0.1, about a minute): mixed REST/SSE, chat/completions, n > 1, dropped
streams, aborts, deadlines, hostile and oversized bodies; afterwards no 5xx,
every accepted request ended exactly once, the server idle with no KV cache
in use, and resident memory flat between the first and last third."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", os.path.join(ROOT, "scripts",
                                                                       "soak.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_soak(llama_dir, tmp_path):
    soak = load_soak()
    s = soak.main(["--model", llama_dir, "--requests", "1000", "--concurrency", "12",
                   "--time-cap", "120", "--rss-bound-mib", "48",
                   "--json", str(tmp_path / "soak.json")])
    assert s["ok"], s["problems"]
    assert s["problems"] == [] and s["rss_growth_mib"] < 48
    # The run exercised what it claims to: every kind of client was answered,
    # and each way a request can end happened on the server.
    kinds = {k.split(":")[0] for k in s["statuses"]}
    assert kinds == set(soak.KINDS), kinds
    ended = s["server_ended"]
    assert ended["completed"] > 300 and ended["cancelled"] > 20 and ended["failed"] == 0
    assert ended["expired"] > 0 and ended["refused"] + s["client_outcomes"]["refused"] > 0
    assert s["server_accepted"] == sum(ended.values())
    assert s["statuses"].get("hostile:400", 0) > 30 and s["statuses"].get("oversized:413", 0)

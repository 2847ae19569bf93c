"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``)
opens ``/dashboard`` on the session's server, giving the API key at the
HTTP authentication prompt; while requests run, the page must show live
data (at least one update a second) and its KV grid and numbers must change,
then return to idle; it must make no request outside the server's origin and
throw no script error; a 100,000-block state must draw quickly. A screenshot taken mid-run goes to
``.ci/artifacts/dashboard.png``, one of the 100,000-block state to
``dashboard-100k.png`` beside it."""

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from cdp_browser import HeadlessChromium
from jpaged.engine.engine_state import engine_state, to_json
from jpaged.serve.dashboard_stats import DashboardStats
from serve_helpers import API_KEY, MODEL_NAME, shared_server
from test_dashboard_state import big_engine

ARTIFACTS = Path(__file__).resolve().parents[1] / ".ci" / "artifacts"
NUMBERS = """(() => { const n = (id) => Number(document.getElementById(id).textContent
    .split('/')[0].replace(/[^0-9.]/g, '') || 'NaN');
  return {updates: Number(document.body.dataset.updates || 0), inUse: n('blocks-in-use'),
          running: n('num-running'), waiting: n('num-waiting'), tps: n('tps'),
          shared: n('blocks-shared'), status: document.getElementById('status').textContent,
          rows: document.getElementById('requests').rows.length}; })()"""
GRID = "document.getElementById('grid').toDataURL()"


def grid_digest(browser) -> str:
    return hashlib.sha256(browser.evaluate(GRID).encode()).hexdigest()


def test_dashboard_in_chromium(llama_dir):
    import openai

    server = shared_server(llama_dir)
    server.wait_idle()
    browser = HeadlessChromium(server.url, credentials=("dashboard", API_KEY))
    try:
        browser.navigate(server.url + "/dashboard")
        browser.wait_for("Number(document.body.dataset.updates || 0) >= 2")
        assert browser.auth_challenges >= 1  # the page itself needed the key
        idle = browser.evaluate(NUMBERS)
        assert idle["inUse"] == 0 and idle["running"] == 0, idle
        idle_grid = grid_digest(browser)

        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                               timeout=300)
        prompt = "A prefix that every request of this test shares, block after block. " * 3
        done = []

        def run(i):
            client.completions.create(model=MODEL_NAME, prompt=prompt + str(i),
                                      max_tokens=400, n=2 if i == 0 else 1, temperature=0.8,
                                      seed=i, extra_body={"ignore_eos": True})
            done.append(i)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(6)]
        for t in threads:
            t.start()
        busy = browser.wait_for(f"(() => {{ const s = {NUMBERS}; return s.running >= 5 && "
                                "s.inUse > 0 && s.shared > 0 && s.tps > 0 ? s : null; })()",
                                timeout=120)
        busy_grid = grid_digest(browser)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.screenshot(str(ARTIFACTS / "dashboard.png"))
        # Live: at least one update a second while the engine is busy.
        t0, u0 = time.monotonic(), busy["updates"]
        time.sleep(3)
        later = browser.evaluate(NUMBERS)
        rate = (later["updates"] - u0) / (time.monotonic() - t0)
        assert rate >= 1.0, (rate, later)
        for t in threads:
            t.join(300)
        assert len(done) == 6
        server.wait_idle()
        end = browser.wait_for(f"(() => {{ const s = {NUMBERS}; "
                               "return s.inUse === 0 && s.running === 0 ? s : null; })()")
        end_grid = grid_digest(browser)
        # The numbers and the grid moved with the engine: idle, busy, idle again.
        assert busy["inUse"] > 0 and busy["shared"] > 0 and end["inUse"] == 0
        assert busy_grid != idle_grid and end_grid != busy_grid
        assert busy["rows"] >= 2 and end["rows"] == 0
        assert "live" in end["status"], end

        # Nothing left the server's origin, by the browser's own record too.
        names = browser.evaluate(
            "performance.getEntriesByType('resource').map(e => e.name)"
            ".concat(performance.getEntriesByType('navigation').map(e => e.name))")
        assert browser.outside == [], browser.outside
        assert all(u.startswith(server.url + "/") for u in browser.requests + names), names
        assert any("/v1/engine/state" in u for u in browser.requests)
        assert browser.errors == [], browser.errors
        # A 100,000-block pool with 256 running requests, drawn by the page
        # (its polling stopped first, so that the screenshot shows this state).
        browser.evaluate("window.setTimeout = () => 0")
        time.sleep(1.5)
        big = to_json({**engine_state(big_engine(), cells=8192),
                       **DashboardStats().summary()}).decode()
        draw_ms = browser.evaluate(
            f"(() => {{ const s = JSON.parse({json.dumps(big)}); const t = performance.now();"
            " render(s); return [performance.now() - t,"
            " document.getElementById('grid-note').textContent,"
            " document.getElementById('requests').rows.length]; })()")
        assert draw_ms[0] < 250 and "13 blocks per cell" in draw_ms[1], draw_ms
        assert draw_ms[2] == 40  # the largest 40 of 256
        browser.screenshot(str(ARTIFACTS / "dashboard-100k.png"))
        print(f"\nbrowser saw: idle {idle}\n busy {busy}\n 3 s later {later} "
              f"({rate:.1f} updates/s)\n end {end}\n {len(browser.requests)} requests, "
              f"all to {server.url}; screenshot {ARTIFACTS / 'dashboard.png'} "
              f"({os.path.getsize(ARTIFACTS / 'dashboard.png')} bytes); 100k blocks "
              f"drawn in {draw_ms[0]:.1f} ms ({draw_ms[1]})")
    finally:
        browser.close()


def test_missing_chromium_fails_naming_the_apt_command(monkeypatch):
    import shutil

    import pytest

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium chromium-driver"):
        HeadlessChromium("http://127.0.0.1:1")

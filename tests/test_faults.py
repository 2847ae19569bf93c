"""Fault injection (jpaged.engine.faults) against a live server on a real tiny
engine: a step that raises fails only its own requests, with a 500 in
OpenAI's error shape (an error event on a stream), /health is 503 while the
engine recovers, and the requests that were waiting, and later ones, succeed
with the same text as before the fault; a request whose detokenization
raises fails alone while its batch-mate finishes."""

import json
import threading
import time

import httpx
import pytest

from serve_helpers import ENGINE_KWARGS, ThreadServer

C = "/v1/completions"
STEP_POISON, DETOK_POISON = 1001, 1002  # prompt tokens that trigger the faults
GOOD = list(range(5, 17))


@pytest.fixture(scope="module")
def server(llama_dir):
    from jpaged.config.engine import EngineConfig
    from jpaged.engine.async_llm import AsyncLLM
    from jpaged.engine.faults import FaultInjector
    from jpaged.engine.llm_engine import LLMEngine
    from jpaged.serve.openai.app import build_app
    from jpaged.serve.openai.state import ServeConfig

    faults = FaultInjector(step_token=STEP_POISON, detok_token=DETOK_POISON, hold_s=1.0)
    engine = LLMEngine(EngineConfig(model=llama_dir, **{**ENGINE_KWARGS, "max_num_seqs": 2}),
                       faults=faults)
    llm = AsyncLLM(engine)
    srv = ThreadServer(build_app(llm, ServeConfig(served_model_names=["m"])), llm)
    yield srv
    srv.stop()


def complete(srv, prompt, max_tokens=8, **kw):
    return httpx.post(srv.url + C, timeout=60, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw})


def assert_500(r):
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "InternalServerError" and err["code"] == 500
    assert "injected" in err["message"]


class Stream:
    """A streaming completion read in a thread: its events, once done."""

    def __init__(self, srv, prompt, max_tokens):
        self.events, self.first = [], threading.Event()

        def run():
            with httpx.stream("POST", srv.url + C, timeout=60, json={
                    "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.first.set()
            self.first.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self):
        self.thread.join(60)
        assert self.events[-1] == "[DONE]"
        return [json.loads(e) for e in self.events[:-1]]


def in_thread(fn, *args, **kw):
    box = []
    t = threading.Thread(target=lambda: box.append(fn(*args, **kw)), daemon=True)
    t.start()
    return t, box


def test_step_fault_fails_its_step_only_and_engine_recovers(server):
    before = complete(server, GOOD)
    assert before.status_code == 200, before.text
    health = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            health.append(httpx.get(server.url + "/health").status_code)
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        # Two running: a long one (in the poisoned step) and a short one that
        # finishes first, freeing the slot the poisoned request takes.
        long_ = Stream(server, list(range(20, 30)), 300)
        short = Stream(server, list(range(30, 40)), 120)
        assert long_.first.wait(60) and short.first.wait(60)
        bad, bad_box = in_thread(complete, server, [5, STEP_POISON, 7])
        while server.engine_state()["waiting"] < 1:
            time.sleep(0.005)
        good, good_box = in_thread(complete, server, GOOD)  # waits behind it: survives
        bad.join(60)
        good.join(60)
        assert_500(bad_box[0])
        assert good_box[0].status_code == 200, good_box[0].text
        assert good_box[0].json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        assert "error" not in short.result()[-1]  # finished before the fault
        last = long_.result()[-1]  # was in the poisoned step: an error event
        assert last["error"]["code"] == 500 and last["error"]["type"] == "InternalServerError"
        end = time.monotonic() + 20
        while (503 not in health or health[-1] != 200) and time.monotonic() < end:
            time.sleep(0.05)  # the outage lasts hold_s after the failed requests heard of it
    finally:
        stop.set()
        poller.join(5)
    down = health.index(503)
    assert health[-1] == 200 and 200 in health[:down]  # up, down, up again
    # Streamed, the poisoned request's failure is an in-band error event.
    s = Stream(server, [STEP_POISON, 9], 4)
    assert s.result()[-1]["error"]["code"] == 500 and s.status == 200
    after = complete(server, GOOD)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == \
        before.json()["choices"][0]["text"]
    assert server.llm.step_failures == 2 and server.llm.is_running
    st = server.wait_idle()
    assert not st["running"] and not st["waiting"] and st["free"] == st["blocks"] - 1


def test_detokenization_fault_fails_that_request_alone(server):
    before = complete(server, GOOD, max_tokens=40)
    failures = server.llm.step_failures
    mate = Stream(server, GOOD, 40)
    assert mate.first.wait(60)
    assert_500(complete(server, [DETOK_POISON, 5, 6], max_tokens=40))
    events = mate.result()
    assert all("error" not in e for e in events)
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == before.json()["choices"][0]["text"]
    assert server.llm.step_failures == failures  # the engine never went down
    assert httpx.get(server.url + "/health").status_code == 200
    st = server.wait_idle()
    assert not st["running"] and not st["waiting"] and st["free"] == st["blocks"] - 1


def test_every_failed_request_is_counted_once(server):
    """Runs after the two tests above: their four failed requests (two of the
    poisoned step, the streamed poison, the detokenization) each ended once."""
    from prometheus_client.parser import text_string_to_metric_families

    m = {}
    for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in fam.samples:
            m[(s.name, s.labels.get("outcome"))] = s.value
    ended = {o: m[("jpaged:requests_ended_total", o)] for o in
             ("completed", "expired", "refused", "cancelled", "failed")}
    assert ended["failed"] == 4
    assert m[("jpaged:requests_accepted_total", None)] == sum(ended.values())
    assert m[("jpaged:requests_open", None)] == 0
    assert m[("jpaged:request_end_anomalies_total", None)] == 0


def test_fault_hook_is_off_unless_the_env_asks(monkeypatch):
    from jpaged.engine.faults import ENV, FaultInjector, InjectedFault

    monkeypatch.delenv(ENV, raising=False)
    assert FaultInjector.from_env() is None  # production: no hook at all
    monkeypatch.setenv(ENV, '{"detok_token": 7, "hold_s": 0.5}')
    f = FaultInjector.from_env()
    assert (f.step_token, f.detok_token, f.hold_s) == (None, 7, 0.5)
    f.check_detok([1, 2, 3])
    with pytest.raises(InjectedFault):
        f.check_detok([1, 7])
    monkeypatch.setenv(ENV, '{"step_tokn": 7}')
    with pytest.raises(ValueError, match="step_tokn"):
        FaultInjector.from_env()

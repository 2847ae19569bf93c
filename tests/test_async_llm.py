"""AsyncLLM against a fake engine whose outputs are known by hand: deltas,
validation errors, aborts on close and cancel, the queue limit, engine death
and shutdown."""

import asyncio
import logging
import time

import pytest

from jpaged.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from jpaged.sampling_params import SamplingParams

from serve_helpers import FakeEngine


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def make_llm():
    made = []

    def make(**kw):
        max_queue_len = kw.pop("max_queue_len", None)
        llm = AsyncLLM(FakeEngine(**kw), max_queue_len=max_queue_len)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.shutdown()


def test_generate_deltas_and_cumulative(make_llm):
    llm = make_llm()

    async def main():
        deltas = [o async for o in llm.generate("p", SamplingParams(max_tokens=5), "a")]
        cums = [o async for o in llm.generate("p", SamplingParams(max_tokens=5), "b",
                                              output_kind="cumulative")]
        return deltas, cums

    deltas, cums = run(main())
    assert deltas[-1].finished and cums[-1].finished
    assert "".join(o.outputs[0].text for o in deltas) == "t1 t2 t3 t4 t5"
    assert sum((o.outputs[0].token_ids for o in deltas), []) == [1, 2, 3, 4, 5]
    assert cums[-1].outputs[0].text == "t1 t2 t3 t4 t5"
    assert cums[-1].outputs[0].finish_reason == "length"


def test_validation_error_is_the_callers_alone(make_llm):
    llm = make_llm(step_delay=0.005)

    async def main():
        async def good(rid):
            return [o async for o in llm.generate("p", SamplingParams(max_tokens=8), rid)]

        task = asyncio.ensure_future(good("ok"))
        with pytest.raises(ValueError, match="refused"):
            async for _ in llm.generate("bad", SamplingParams(), "x"):
                pass
        with pytest.raises(ValueError):  # duplicate id while "ok" runs
            await asyncio.sleep(0.01)
            await llm.add_request("ok", "p", SamplingParams())
        return await task

    outs = run(main())
    assert outs[-1].finished and llm.errored is None


def test_close_and_cancel_abort(make_llm):
    llm = make_llm(step_delay=0.01)

    async def main():
        gen = llm.generate("p", SamplingParams(max_tokens=1000), "closed")
        await gen.__anext__()
        await gen.aclose()

        async def consume():
            async for _ in llm.generate("p", SamplingParams(max_tokens=1000), "cancelled"):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not llm.call(lambda e: e.has_unfinished_requests()):
                break
            await asyncio.sleep(0.02)

    run(main())
    assert set(llm.engine.aborted) == {"closed", "cancelled"}
    assert not llm.engine.has_unfinished_requests()


def test_abort_by_id_ends_the_stream(make_llm):
    llm = make_llm(step_delay=0.01)

    async def main():
        outs = []
        async for out in llm.generate("p", SamplingParams(max_tokens=1000), "r"):
            outs.append(out)
            if len(outs) == 2:
                llm.abort("r")
        return outs

    outs = run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


def test_queue_full(make_llm):
    llm = make_llm(max_running=1, step_delay=0.01, max_queue_len=2)

    async def main():
        streams = [await llm.add_request(f"r{i}", "p", SamplingParams(max_tokens=500))
                   for i in range(3)]  # one runs (after a step), two wait
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFullError):
            await llm.add_request("r3", "p", SamplingParams(max_tokens=5))
        for s in streams:
            s.close()

    run(main())


def test_engine_error_fails_everyone(make_llm):
    llm = make_llm(step_delay=0.005, fail_after=5)

    async def main():
        async def consume(rid):
            async for _ in llm.generate("p", SamplingParams(max_tokens=1000), rid):
                pass

        results = await asyncio.gather(*(consume(f"r{i}") for i in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        with pytest.raises(EngineDeadError):
            await llm.add_request("late", "p", SamplingParams())

    run(main())
    assert isinstance(llm.errored, RuntimeError) and not llm.is_running


def test_shutdown_fails_in_flight(make_llm):
    llm = make_llm(step_delay=0.01)

    async def main():
        stream = await llm.add_request("r", "p", SamplingParams(max_tokens=1000))
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass

    run(main())
    assert not llm._thread.is_alive()


def test_unread_stream_holds_one_merged_output_not_one_per_step(make_llm):
    """A reader that stops reading costs its own output in memory, not an
    output per step (each as long as the text so far)."""
    import tracemalloc

    llm = make_llm(pad=200)  # each token's text is ~200 characters

    async def main():
        stream = await llm.add_request("r", "p", SamplingParams(max_tokens=600),
                                       output_kind="cumulative")
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            while llm.engine.groups:  # the engine runs to the end; nobody reads
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        outs = [o async for o in stream]
        return held, outs

    held, outs = run(main(), timeout=60)
    assert len(outs) == 1 and outs[0].finished  # everything merged into one output
    assert len(outs[0].outputs[0].token_ids) == 600
    # The final text is ~120 kB; 600 queued cumulative outputs would be ~36 MB.
    assert held < 3_000_000, held


@pytest.mark.parametrize("kind", ["cumulative", "delta"])
def test_abort_under_a_slow_reader_reports_every_token(make_llm, kind):
    llm = make_llm(step_delay=0.005)

    async def main():
        stream = await llm.add_request("r", "p", SamplingParams(max_tokens=1000),
                                       output_kind=kind)
        first = await stream.__anext__()
        while llm.engine.steps < 20:  # the engine goes on; the reader does not read
            await asyncio.sleep(0.01)
        llm.abort("r")  # as the server does on shutdown or a deadline
        rest = [o async for o in stream]
        return [first] + rest

    outs = run(main())
    generated = llm.engine.generated_at_abort["r"]
    assert generated >= 20
    final = outs[-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"
    if kind == "cumulative":
        assert final.outputs[0].token_ids == list(range(1, generated + 1))
    else:
        assert sum((o.outputs[0].token_ids for o in outs if o.outputs), []) == \
            list(range(1, generated + 1))


def test_observer_errors_never_stop_the_engine(make_llm, caplog):
    class Broken:
        def __init__(self):
            self.calls = 0

        def on_output(self, out):
            self.calls += 1
            raise RuntimeError("observer bug")

        def on_step(self, stats):
            raise RuntimeError("observer bug")

        def on_abort(self, request_id):
            raise RuntimeError("observer bug")

    llm = make_llm()
    broken = Broken()
    llm.stat_loggers.append(broken)

    async def main():
        outs = [o async for o in llm.generate("p", SamplingParams(max_tokens=5), "a")]
        gen = llm.generate("p", SamplingParams(max_tokens=1000), "b")
        await gen.__anext__()
        await gen.aclose()  # on_abort raises too
        return outs, [o async for o in llm.generate("p", SamplingParams(max_tokens=3), "c")]

    with caplog.at_level(logging.ERROR):
        outs, later = run(main())
    assert outs[-1].finished and later[-1].finished
    assert llm.is_running and broken.calls >= 8
    assert any("observer bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_a_closed_event_loop_fails_only_its_own_request(make_llm):
    llm = make_llm(step_delay=0.3)

    async def survivor():
        return [o async for o in llm.generate("p", SamplingParams(max_tokens=3), "ok")]

    async def orphan():
        # Submitted while the engine is busy in a step; this loop is closed
        # before the engine gets to accept it.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(llm.add_request("orphan", "p", SamplingParams(max_tokens=500)),
                                   0.05)

    async def main():
        task = asyncio.ensure_future(survivor())
        await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, asyncio.run, orphan())
        return await task

    outs = run(main())
    assert outs[-1].finished and llm.is_running and llm.errored is None
    for _ in range(100):
        if not llm.call(lambda e: e.has_unfinished_requests()):
            break
        time.sleep(0.05)
    assert "orphan" not in llm.engine.groups


def test_engine_abort_drops_the_metrics_entry(make_llm):
    from jpaged.serve.metrics import ServerMetrics

    llm = make_llm(step_delay=0.005)
    metrics = ServerMetrics("m")
    llm.stat_loggers.append(metrics)

    async def main():
        stream = await llm.add_request("r", "p", SamplingParams(max_tokens=1000))
        for _ in range(3):
            await stream.__anext__()
        assert "r" in metrics._progress
        llm.abort("r")  # not the reader: the server (shutdown, a deadline)
        return [o async for o in stream]

    outs = run(main())
    assert outs[-1].finished
    for _ in range(100):
        if not metrics._progress:
            break
        time.sleep(0.01)
    assert metrics._progress == {}
    assert metrics.success.labels("m", "abort")._value.get() == 1

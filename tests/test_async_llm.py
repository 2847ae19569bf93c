"""AsyncLLM against a fake engine whose outputs are known by hand: deltas,
validation errors, aborts on close and cancel, the queue limit, engine death
and shutdown."""

import asyncio

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

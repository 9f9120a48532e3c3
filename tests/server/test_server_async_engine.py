"""AsyncLLMEngine without HTTP: streaming, aborts, admission limits, drain, failures."""
from __future__ import annotations

import asyncio

import pytest

from turbollm import SamplingParams
from turbollm.engine.async_engine import (AsyncLLMEngine, EngineDeadError, EngineNotReadyError,
                                          EngineOverloadedError, EngineState,
                                          RequestAbortedError)
from turbollm.engine.errors import ContextLengthExceededError

from conftest import ENGINE_KWARGS


@pytest.fixture(scope="module")
def llm_engine(tiny_llama):
    from turbollm.engine.llm_engine import LLMEngine
    return LLMEngine.from_kwargs(model=str(tiny_llama), **{**ENGINE_KWARGS, "max_num_seqs": 4})


def run(llm_engine, coro_fn, **kw):
    """Run coro_fn(async_engine) on a fresh event loop with a started engine thread."""
    async def main():
        eng = AsyncLLMEngine(llm_engine, **kw)
        eng.start()
        await eng.wait_ready(30)
        try:
            return await coro_fn(eng)
        finally:
            await asyncio.to_thread(eng.stop)
    return asyncio.run(main())


def _pool_clean(e) -> bool:
    pool = e.kv_manager.pool
    return pool.num_free + pool.num_cached == pool.num_blocks and not e.has_unfinished_requests()


def test_generate_matches_offline_and_streams_deltas(llm_engine):
    params = SamplingParams(temperature=0, max_tokens=12)
    llm_engine.add_request("offline", "hello world", params)
    expected = llm_engine.run_until_done()[0].outputs[0].text

    async def go(eng):
        deltas, last = [], None
        async for out in eng.generate("a", "hello world", params):
            deltas.append(out.outputs[0].delta_text)
            last = out
        return "".join(deltas), last

    text, last = run(llm_engine, go)
    assert text == expected == last.outputs[0].text
    assert last.finished and last.outputs[0].finish_reason == "length"


def test_consumer_leaving_aborts_and_frees(llm_engine):
    async def go(eng):
        agen = eng.generate("long", "abandon", SamplingParams(max_tokens=300, ignore_eos=True))
        async for _ in agen:
            break
        await agen.aclose()  # the consumer went away
        for _ in range(200):
            await asyncio.sleep(0.01)
            if _pool_clean(llm_engine):
                return True
        return False

    assert run(llm_engine, go)


def test_cancelled_consumer_aborts(llm_engine):
    async def go(eng):
        async def consume():
            async for _ in eng.generate("c", "cancel me",
                                        SamplingParams(max_tokens=300, ignore_eos=True)):
                pass
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            await asyncio.sleep(0.01)
            if _pool_clean(llm_engine):
                return eng.num_in_flight
        return -1

    assert run(llm_engine, go) == 0


def test_validation_error_raised_at_submit(llm_engine):
    async def go(eng):
        with pytest.raises(ContextLengthExceededError):
            await eng.add_request("big", [5] * 10, SamplingParams(max_tokens=10**6))
        return eng.num_queued, eng.num_in_flight

    assert run(llm_engine, go) == (0, 0)


def test_queue_bound(llm_engine):
    async def go(eng):
        p = SamplingParams(max_tokens=50, ignore_eos=True)
        # A burst: nothing is scheduled before all are submitted, so only 2 fit.
        got = await asyncio.gather(*(eng.add_request(f"q{i}", "fill", p) for i in range(6)),
                                   return_exceptions=True)
        streams = [g for g in got if not isinstance(g, BaseException)]
        errors = [g for g in got if isinstance(g, BaseException)]
        assert len(streams) == 2 and all(isinstance(e, EngineOverloadedError) for e in errors)
        for s in streams:
            s.abort()
        return True

    assert run(llm_engine, go, max_queued_requests=2)


def test_drain_finishes_in_flight_and_refuses_new(llm_engine):
    async def go(eng):
        stream = await eng.add_request("d", "drain", SamplingParams(max_tokens=30,
                                                                   ignore_eos=True))
        drain = asyncio.create_task(eng.drain(timeout=30))
        await asyncio.sleep(0)
        assert eng.state == EngineState.DRAINING
        with pytest.raises(EngineNotReadyError):
            await eng.add_request("late", "x", SamplingParams())
        outs = [o async for o in stream]
        return await drain, outs[-1].outputs[0].finish_reason

    assert run(llm_engine, go) == (0, "length")


def test_drain_timeout_aborts(llm_engine):
    async def go(eng):
        stream = await eng.add_request("t", "slow", SamplingParams(max_tokens=400,
                                                                  ignore_eos=True))
        aborted = await eng.drain(timeout=0.05)
        with pytest.raises(RequestAbortedError):
            async for _ in stream:
                pass
        await asyncio.sleep(0.2)
        return aborted

    assert run(llm_engine, go) == 1
    assert _pool_clean(llm_engine)


def test_engine_death_fails_streams_and_new_requests(tiny_llama):
    from turbollm.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_kwargs(model=str(tiny_llama), **ENGINE_KWARGS)
    fatal = []

    async def main():
        eng = AsyncLLMEngine(engine, on_fatal=fatal.append)
        eng.start()
        await eng.wait_ready(30)
        stream = await eng.add_request("x", "hi", SamplingParams(max_tokens=100,
                                                                ignore_eos=True))
        await stream.get()

        def boom(*args):
            raise RuntimeError("scheduler bug")
        engine.scheduler.schedule = boom
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await eng.add_request("y", "hi", SamplingParams())
        state = eng.state
        await asyncio.to_thread(eng.stop)
        return state

    assert asyncio.run(main()) == EngineState.BROKEN
    assert len(fatal) == 1 and "scheduler bug" in str(fatal[0])


def test_loading_failure_is_broken(tmp_path):
    def load():
        raise FileNotFoundError("no such model")

    async def main():
        eng = AsyncLLMEngine(load)
        eng.start()
        with pytest.raises(EngineDeadError):
            await eng.wait_ready(30)
        return eng.state

    assert asyncio.run(main()) == EngineState.BROKEN


def test_prefill_backlog_and_rate_are_counted(llm_engine):
    e = llm_engine
    assert not e.has_unfinished_requests()
    tokens0, seconds0 = e.stats.prefill_tokens, e.stats.prefill_seconds
    prompts = [list(range(5, 45)), list(range(7, 27))]  # 40 + 20 prompt tokens
    for i, p in enumerate(prompts):
        e.add_request(f"b{i}", p, SamplingParams(max_tokens=2, ignore_eos=True))
    assert e.prefill_backlog() == 60
    while e.has_unfinished_requests():
        e.step()
    assert e.prefill_backlog() == 0
    assert e.stats.prefill_tokens - tokens0 == 60  # decode tokens are not counted
    assert e.stats.prefill_seconds > seconds0


def test_admission_refuses_when_the_prompts_ahead_take_too_long(llm_engine):
    eng = AsyncLLMEngine(llm_engine, max_queue_delay=0.5)
    assert eng._refusal(0.0) is None  # no rate measured yet: nothing predicted
    eng._prefill_rate, eng._backlog_tokens = 1000.0, 400  # 0.4 s ahead
    assert eng._refusal(0.0) is None
    eng._backlog_tokens = 600  # 0.6 s ahead
    assert "600 prompt tokens are ahead" in eng._refusal(0.0)
    eng.max_queue_delay = 0.0  # shedding off: no prediction either
    assert eng._refusal(0.0) is None
def test_admission_counts_the_prompts_admitted_before_the_engine_took_them(llm_engine):
    """A burst arriving during one step: the backlog the engine last reported has none of it,
    so the prompts admitted since (inbox, or added after the report) count as ahead too."""
    async def go(eng):
        eng._update_prefill_estimate = lambda: None  # keep the rate and backlog set here
        eng._prefill_rate = 1000.0  # max_queue_delay 0.5 s = 500 prompt tokens ahead
        p = SamplingParams(max_tokens=2, ignore_eos=True)
        got = await asyncio.gather(*(eng.add_request(f"u{i}", list(range(5, 205)), p)
                                     for i in range(5)), return_exceptions=True)
        streams = [g for g in got if not isinstance(g, BaseException)]
        errors = [g for g in got if isinstance(g, BaseException)]
        # 0, 200 and 400 tokens ahead: admitted; 600 ahead: refused (whichever of them the
        # engine thread has taken meanwhile)
        assert len(streams) == 3
        assert all(isinstance(e, EngineOverloadedError) and "600 prompt tokens" in str(e)
                   for e in errors)
        for st in streams:
            st.abort()
        return True

    assert run(llm_engine, go, max_queue_delay=0.5)



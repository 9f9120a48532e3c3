"""Engine faults: a failing step fails only its requests (500 / SSE error event) and the server
keeps serving; an engine loop that dies makes /ready 503, fails clients fast and stops the
server with a non-zero exit code."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import MODEL_NAME

POISON = 4242  # a prompt starting with this token id makes the patched step raise


@pytest.fixture
def faulty(make_server_fixture):
    live = make_server_fixture(max_num_seqs=8)
    runner = live.llm_engine.executor.worker.runner
    original = runner.execute

    def execute(batch):
        if any(s.prompt_token_ids[0] == POISON for s in batch.sequences):
            raise RuntimeError("injected step failure")
        return original(batch)

    runner.execute = execute  # a plain attribute swap: read by the engine thread next step
    return live


def _complete(live, prompt, stream=False, max_tokens=4):
    return httpx.post(live.base_url + "/v1/completions", timeout=30, json={
        "model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "stream": stream})


def test_failing_step_fails_only_its_requests(faulty):
    r = _complete(faulty, [POISON, 5, 6])
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"
    r = _complete(faulty, [POISON, 7], stream=True)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["error"]["code"] == "engine_error"
    assert events[-1] == "[DONE]"
    # The server keeps serving and holds nothing for the failed requests.
    assert _complete(faulty, "still alive").status_code == 200
    assert httpx.get(faulty.base_url + "/ready").status_code == 200
    faulty.wait_idle()
    faulty.assert_no_blocks_held()
    metrics = httpx.get(faulty.base_url + "/metrics").text
    assert "turbollm_engine_step_errors_total 2.0" in metrics


def test_engine_loop_death_fails_fast_and_exits_nonzero(make_server_fixture):
    live = make_server_fixture(max_num_seqs=4)
    sched = live.llm_engine.scheduler
    original = sched.schedule
    state = {"calls": 0}

    def schedule():
        state["calls"] += 1
        if state["calls"] > 3:  # let the request start, then break the loop for good
            raise MemoryError("injected unrecoverable failure")
        return original()

    sched.schedule = schedule
    t0 = time.monotonic()
    r = _complete(live, "doomed", max_tokens=200)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_dead"
    assert time.monotonic() - t0 < 10
    live.thread.join(15)  # the server shuts itself down
    assert not live.thread.is_alive()
    assert live.server.exit_code == 1
    assert live.engine.state.value == "broken"


def _arm(live, forwards: int, fault_times: list):
    """The server's fault plan (TURBOLLM_INJECT_FAULT) moved to `forwards` forwards from now,
    noting when it fires."""
    from turbollm.worker.faults import InjectedFault
    plan = live.llm_engine.executor.worker.runner.faults
    plan.first = plan.forwards + forwards
    fire = plan.before_forward

    def noted():
        try:
            fire()
        except InjectedFault:
            fault_times.append(time.monotonic())
            raise
    plan.before_forward = noted


async def _stream(http, url: str, i: int) -> tuple[str, float]:
    """('ok' | 'error', when the stream ended) for one streamed completion."""
    body = {"model": MODEL_NAME, "prompt": f"story {i} about", "max_tokens": 40,
            "ignore_eos": True, "stream": True, "temperature": 0.7}
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        outcome = "ok"
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"error"' in line:
                outcome = "error"
            if line == "data: [DONE]":
                break
    return outcome, time.monotonic()


def _run_streams(url: str, n: int) -> list[tuple[str, float]]:
    import asyncio

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n + 8)) \
                as http:
            return await asyncio.gather(*(_stream(http, url, i) for i in range(n)))
    return asyncio.run(main())


def test_forward_fault_with_64_streams_fails_its_step_only(make_server_fixture, monkeypatch):
    """An exception in the model forward with 64 streams in flight: the requests of that step
    end with an error event at once, the rest finish, the server stays ready and every KV block
    comes back (free + cached == total)."""
    monkeypatch.setenv("TURBOLLM_INJECT_FAULT", "1000000")  # armed below, once streams run
    live = make_server_fixture(max_num_seqs=32)  # 64 streams: half wait their turn
    fault_times: list[float] = []
    _arm(live, 20, fault_times)
    results = _run_streams(live.base_url, 64)
    assert len(fault_times) == 1
    errors = [t for outcome, t in results if outcome == "error"]
    assert 0 < len(errors) <= 32 and len(errors) < len(results)
    assert max(errors) - fault_times[0] < 5.0  # every affected request told within 5 s
    assert httpx.get(live.base_url + "/ready").status_code == 200
    assert _complete(live, "after the fault").status_code == 200
    live.wait_idle()
    live.llm_engine.kv_manager.pool.check_invariant()
    live.assert_no_blocks_held()


def test_persistent_forward_fault_stops_the_server(make_server_fixture, monkeypatch):
    """A forward that fails whatever runs (the one-token probe after the failed step fails
    too): the engine stops, clients get an error at once, and the server exits non-zero
    instead of failing every later request one step at a time."""
    monkeypatch.setenv("TURBOLLM_INJECT_FAULT", "1000000+")
    live = make_server_fixture(max_num_seqs=8)
    fault_times: list[float] = []
    _arm(live, 3, fault_times)
    results = _run_streams(live.base_url, 8)
    assert all(outcome == "error" for outcome, _ in results)
    assert max(t for _, t in results) - fault_times[0] < 5.0
    live.thread.join(15)
    assert not live.thread.is_alive() and live.server.exit_code == 1
    assert live.engine.state.value == "broken"
    assert "ModelBrokenError" in repr(live.engine.fatal_error)

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

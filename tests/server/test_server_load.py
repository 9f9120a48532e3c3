"""Concurrency: many streaming clients with random disconnects, queue overflow (429), and
aborts of requests whose client went away."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import httpx

from turbollm.server.config import ServerConfig

from conftest import MODEL_NAME

BODY = {"model": MODEL_NAME, "prompt": "Tell me a long story about", "max_tokens": 48,
        "temperature": 0.7, "ignore_eos": True, "stream": True}


async def _stream_client(http: httpx.AsyncClient, url: str, i: int, disconnect_after: int | None
                         ) -> str:
    """Stream one completion; 'ok' when it finished, 'dropped' if we hung up on purpose."""
    path, body = ("/v1/chat/completions", {**BODY, "messages": [
        {"role": "user", "content": f"story {i}"}]}) if i % 2 else ("/v1/completions", BODY)
    body = {**body, "seed": i}
    chunks = 0
    async with http.stream("POST", url + path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "ok"
            payload = json.loads(line[6:])
            assert "error" not in payload, payload
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                return "dropped"  # leaving the block closes the connection mid-stream
    raise AssertionError("stream ended without [DONE]")


def test_64_streams_quarter_disconnect(server):
    rng = random.Random(0)
    drops = set(rng.sample(range(64), 16))

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*(
                _stream_client(http, server.base_url, i,
                               rng.randint(1, 30) if i in drops else None)
                for i in range(64)))

    results = asyncio.run(main())
    assert [r for i, r in enumerate(results) if i not in drops] == ["ok"] * 48
    assert all(results[i] == "dropped" for i in drops)
    server.wait_idle()
    server.assert_no_blocks_held()
    assert server.engine.num_queued == 0


def test_queue_overflow_gives_429_while_admitted_complete(make_server_fixture):
    live = make_server_fixture(ServerConfig(port=0, max_queued_requests=2), max_num_seqs=2)
    body = {"model": MODEL_NAME, "prompt": "queue", "max_tokens": 32, "ignore_eos": True}

    async def one(http, i):
        t0 = time.monotonic()
        r = await http.post(live.base_url + "/v1/completions", json={**body, "seed": i})
        return r, time.monotonic() - t0

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as h:
            return await asyncio.gather(*(one(h, i) for i in range(24)))

    results = asyncio.run(main())
    ok = [r for r, _ in results if r.status_code == 200]
    limited = [(r, dt) for r, dt in results if r.status_code == 429]
    assert len(ok) >= 2 and limited, [r.status_code for r, _ in results]
    assert all(r.status_code in (200, 429) for r, _ in results)
    for r in ok:
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"]["completion_tokens"] == 32
    for r, dt in limited:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "too_many_requests"
    # Refused fast: well before the admitted requests could have finished.
    assert min(dt for _, dt in limited) < max(dt for r, dt in results if r.status_code == 200)
    live.wait_idle()
    assert live.engine.num_queued == 0
    r = httpx.post(live.base_url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200


def _open_request(port: int, path: str, body: dict) -> socket.socket:
    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return s


def _wait_running(server, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.llm_engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)


def test_disconnect_mid_request_aborts_and_frees(server):
    server.wait_idle()
    long_body = {"model": MODEL_NAME, "max_tokens": 400, "ignore_eos": True}
    for path, extra in (("/v1/completions", {"prompt": "abandon me"}),
                        ("/v1/completions", {"prompt": "abandon me", "stream": True}),
                        ("/v1/chat/completions", {"messages": [
                            {"role": "user", "content": "abandon"}]}),
                        ("/generate", {"inputs": "abandon", "parameters": {
                            "max_new_tokens": 400}})):
        s = _open_request(server.port, path, {**long_body, **extra})
        _wait_running(server)
        time.sleep(0.05)
        s.close()  # the client goes away mid-request
        t0 = time.monotonic()
        server.wait_idle(timeout=5)
        # Far less than the 400 steps the request had left.
        assert time.monotonic() - t0 < 1.0, path
        server.assert_no_blocks_held()
    # Non-streaming requests whose client left are counted as 499 (nginx's "client closed").
    metrics = httpx.get(server.base_url + "/metrics").text
    assert 'turbollm_http_requests_total{route="/generate",status="499"}' in metrics


def test_twice_the_kv_capacity_preempts_and_matches_solo(make_server_fixture):
    """Concurrent long requests needing twice the KV cache: preemptions happen, every request
    finishes, and the greedy answers equal each request sent alone (batch_invariant='all':
    every row computed as if alone, so recompute and batch make-up change no bits)."""
    live = make_server_fixture(num_gpu_blocks_override=24, batch_invariant="all")
    prompts = [f"request {i}: " + "tell me more about the sea " * 5 for i in range(8)]

    def body(p):  # ~40 prompt + 56 output tokens: 6 of the 24 blocks each, 8 at once
        return {"model": MODEL_NAME, "prompt": p, "max_tokens": 56, "temperature": 0,
                "ignore_eos": True}

    async def together():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(live.base_url + "/v1/completions",
                                                    json=body(p)) for p in prompts))

    batch = asyncio.run(together())
    assert [r.status_code for r in batch] == [200] * 8
    assert live.llm_engine.scheduler.num_preemptions > 0
    solo = [httpx.post(live.base_url + "/v1/completions", json=body(p), timeout=60)
            for p in prompts]
    texts = [r.json()["choices"][0]["text"] for r in batch]
    assert texts == [r.json()["choices"][0]["text"] for r in solo]
    assert all(r.json()["usage"]["completion_tokens"] == 56 for r in batch)
    live.wait_idle()
    live.assert_no_blocks_held()

"""Requests that arrive while the model is still loading get a 503 in OpenAI's error shape
(come back later), never a 500 from an engine that is not there yet; once loaded, they work."""
from __future__ import annotations

import threading
import time

import httpx

from conftest import ENGINE_KWARGS, MODEL_NAME
from turbollm.engine.async_engine import AsyncLLMEngine
from turbollm.server.app import build_app
from turbollm.server.config import ServerConfig
from turbollm.server.runner import bind_socket, make_server

REQUESTS = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": 1.0}}),
    ("/v1/embeddings", {"input": "hi"}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
]


def test_requests_while_loading_get_503_then_work(tiny_llama):
    from turbollm.engine.llm_engine import LLMEngine
    release = threading.Event()

    def load():
        release.wait(120)
        return LLMEngine.from_kwargs(model=str(tiny_llama), **ENGINE_KWARGS)

    cfg = ServerConfig(port=0)
    engine = AsyncLLMEngine(load)
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = make_server(build_app(engine, cfg, MODEL_NAME), engine, "127.0.0.1",
                         sock.getsockname()[1], cfg.shutdown_timeout, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # listening (health answers) while the engine loads
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(url + "/ready", timeout=5).status_code == 503
        for path, body in REQUESTS:
            r = httpx.post(url + path, json={"model": MODEL_NAME, **body}, timeout=10)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "not_ready", (path, r.text)
            assert r.headers["Retry-After"] == "5"
        release.set()
        deadline = time.monotonic() + 120
        while httpx.get(url + "/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for path, body in REQUESTS:
            r = httpx.post(url + path, json={"model": MODEL_NAME, **body}, timeout=60)
            assert r.status_code == 200, (path, r.text)
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)

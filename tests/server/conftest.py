"""Live servers on loopback for the server tests: the real app under uvicorn, in a thread."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from turbollm.engine.async_engine import AsyncLLMEngine
from turbollm.server.app import build_app
from turbollm.server.config import ServerConfig
from turbollm.server.runner import DrainingServer, bind_socket, make_server

MODEL_NAME = "tiny"
ENGINE_KWARGS = dict(dtype="float32", kv_cache_memory="16MiB", max_num_seqs=64, num_threads=1)


@dataclass
class LiveServer:
    base_url: str
    engine: AsyncLLMEngine
    server: DrainingServer
    thread: threading.Thread
    cfg: ServerConfig

    @property
    def llm_engine(self):
        return self.engine.engine

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the engine holds no request (it is read from the test thread: a
        snapshot, good enough once traffic has stopped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            e = self.llm_engine
            if not e.has_unfinished_requests() and not self.engine.num_in_flight \
                    and not e.outputs.groups:
                return
            time.sleep(0.02)
        raise AssertionError("the engine did not become idle")

    def assert_no_blocks_held(self) -> None:
        pool = self.llm_engine.kv_manager.pool
        assert pool.num_free + pool.num_cached == pool.num_blocks, (
            pool.num_free, pool.num_cached, pool.num_blocks)


def start_server(model_dir, cfg: ServerConfig | None = None, **engine_kwargs) -> LiveServer:
    """Start the app on 127.0.0.1:<free port> in a thread and wait for /ready."""
    from turbollm.engine.llm_engine import LLMEngine
    cfg = cfg or ServerConfig(port=0)
    kwargs = {**ENGINE_KWARGS, **engine_kwargs}
    engine = AsyncLLMEngine(lambda: LLMEngine.from_kwargs(model=str(model_dir), **kwargs),
                            max_queued_requests=cfg.max_queued_requests,
                            max_queue_delay=cfg.max_queue_delay)
    app = build_app(engine, cfg, MODEL_NAME)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(app, engine, "127.0.0.1", port, cfg.shutdown_timeout,
                         log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"uvicorn-{port}")
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", engine, server, thread, cfg)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(live.base_url + "/ready", headers=headers, timeout=2).status_code == 200:
                return live
        except httpx.TransportError:
            pass
        if not thread.is_alive():
            break
        time.sleep(0.05)
    live.stop()
    raise RuntimeError("the test server did not become ready")


@pytest.fixture(scope="session")
def server(tiny_llama):
    """The shared server: default limits, no auth, no CORS."""
    live = start_server(tiny_llama)
    yield live
    live.stop()


@pytest.fixture
def make_server_fixture(tiny_llama):
    """Start extra servers with their own config; stopped after the test."""
    started: list[LiveServer] = []

    def make(cfg: ServerConfig | None = None, **engine_kwargs) -> LiveServer:
        live = start_server(tiny_llama, cfg, **engine_kwargs)
        started.append(live)
        return live

    yield make
    for live in started:
        live.stop()


def raw_http(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send bytes as they are (no client-side path normalization); (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def assert_error_shape(resp: httpx.Response, status: int, code: str | None = None,
                       param: str | None = None) -> dict:
    """The response is an OpenAI-shaped error with this status (and code / param)."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert len(resp.content) < 2048, len(resp.content)
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err

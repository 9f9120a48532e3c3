"""Running the app under uvicorn with a graceful drain on SIGTERM / SIGINT.

Uvicorn's own shutdown stops listening at once, so clients arriving during the drain would
get connection errors. Here the first signal only starts the drain: the server keeps
listening, /ready and new requests answer 503, in-flight requests get `shutdown_timeout`
seconds to finish (the rest are aborted), and only then does uvicorn shut down. A second
signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from turbollm.engine.async_engine import AsyncLLMEngine, EngineState

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signals drain the engine first."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, shutdown_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        engine.on_fatal = self._on_engine_fatal

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        # Not recording the signal (as uvicorn does) keeps it from being re-raised after
        # shutdown, which would turn a clean drain into a "killed by SIGTERM" exit status.
        if self._draining or self._loop is None:
            self.force_exit = True
            self.should_exit = True
            return
        self.request_drain()

    def request_drain(self) -> None:
        """Start the graceful drain (thread-safe; idempotent)."""
        if self._draining:
            return
        self._draining = True
        if self._loop is None:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        log.info("draining: %d requests in flight, up to %.0fs", self.engine.num_in_flight,
                 self.shutdown_timeout)
        aborted = await self.engine.drain(self.shutdown_timeout)
        if aborted:
            log.warning("shutdown timeout: aborted %d requests", aborted)
        await asyncio.sleep(0.1)  # let the last response bytes go out
        self.should_exit = True

    def _on_engine_fatal(self, exc: BaseException) -> None:
        log.error("the engine cannot recover (%s: %s); exiting", type(exc).__name__, exc)
        self.should_exit = True

    @property
    def exit_code(self) -> int:
        """0 after a clean shutdown, 1 when the engine broke."""
        return 1 if self.engine.state == EngineState.BROKEN else 0


def make_server(app, engine: AsyncLLMEngine, host: str, port: int, shutdown_timeout: float,
                log_level: str = "info") -> DrainingServer:
    """A DrainingServer for the app (call .run() or .run(sockets=[...]))."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=5,
                            lifespan="on", server_header=False)
    return DrainingServer(config, engine, shutdown_timeout)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock

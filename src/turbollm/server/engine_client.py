"""What the endpoint handlers need from the engine: model names, tokenization off the event
loop, request submission with engine errors mapped to HTTP errors, and collecting results."""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from turbollm.engine.async_engine import (AsyncLLMEngine, EngineDeadError, EngineNotReadyError,
                                          EngineOverloadedError, EngineState, RequestAbortedError,
                                          RequestStream)
from turbollm.core.lora_request import LoRARequest
from turbollm.engine.errors import KVCacheBusyError, RequestValidationError
from turbollm.engine.outputs import RequestOutput
from turbollm.sampling_params import SamplingParams
from turbollm.server.config import ServerConfig
from turbollm.server.errors import APIError
from turbollm.server.logprobs import TokenText
from turbollm.server.lora_adapters import LoRAAdapters, parse_lora_modules
from turbollm.server.responses_store import ResponseStore
from turbollm.server.template_render import TemplateRenderer
from turbollm.server.tool_parsers import ToolCallParser, make_parser

log = logging.getLogger(__name__)


def engine_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised by the async engine."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, str(exc), None, "too_many_requests", {"Retry-After": "1"})
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, str(exc), None, "not_ready", {"Retry-After": "5"})
    if isinstance(exc, RequestAbortedError):
        return APIError(503, str(exc), None, "server_shutting_down")
    if isinstance(exc, EngineDeadError):
        return APIError(500, "the engine stopped; the server is exiting", None, "engine_dead")
    if isinstance(exc, RequestValidationError):
        return APIError(400, str(exc), exc.param, exc.code)
    if isinstance(exc, KVCacheBusyError):
        return APIError(503, f"the server is busy: {exc}", None, "busy", {"Retry-After": "1"})
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), None, "invalid_value")
    log.error("request failed: %r", exc)
    return APIError(500, "internal server error", None, "internal_error")


def output_error(out: RequestOutput) -> APIError | None:
    """A 500 if the engine failed while running this request."""
    if out.error is None:
        return None
    return APIError(500, f"the engine failed while running this request: {out.error}", None,
                    "engine_error")


class EngineClient:
    """Shared state of the endpoints: the engine, the server config, a tokenizer thread."""

    def __init__(self, engine: AsyncLLMEngine, cfg: ServerConfig, model_name: str):
        self.engine = engine
        self.cfg = cfg
        self.model_name = model_name  # what /v1/models lists and requests must name
        # LoRA adapters, named like models (--lora-modules, /v1/load_lora_adapter)
        self.loras = LoRAAdapters(model_name, parse_lora_modules(cfg.lora_modules),
                                  cfg.lora_dir)
        self.created = int(time.time())
        self.responses = ResponseStore(cfg.responses_store_size, cfg.responses_store_ttl)
        # One thread does all request-side tokenization and template rendering: CPU work that
        # must not block the event loop, serialized because tokenizers are not reentrant.
        self._tok_pool = ThreadPoolExecutor(1, thread_name_prefix="turbollm-tokenize")
        self._ids = itertools.count()
        self._id_salt = os.urandom(4).hex()
        self._token_text: TokenText | None = None
        self._renderer: TemplateRenderer | None = None

    def close(self) -> None:
        self._tok_pool.shutdown(wait=False, cancel_futures=True)
        if self._renderer is not None:
            self._renderer.close()

    def request_template_renderer(self) -> TemplateRenderer:
        """The child process that renders chat templates sent in requests, started on first use
        (on the tokenizer thread, which serializes its callers)."""
        if self._renderer is None:
            self._renderer = TemplateRenderer(self.tokenizer)
        return self._renderer

    @functools.cached_property
    def tool_parser(self) -> ToolCallParser:
        """How tool calls are read from answers to the served template (--tool-call-parser)."""
        return make_parser(self.cfg.tool_call_parser,
                           getattr(self.tokenizer, "chat_template", None))

    @property
    def token_text(self) -> TokenText:
        """Text of single token ids for logprobs (one cache for the whole server)."""
        if self._token_text is None:
            self._token_text = TokenText(self.tokenizer)
        return self._token_text

    # ----- checks -----
    def check_model(self, name: str | None) -> str:
        """The served name, or an adapter's; 404 if the request names another model."""
        if name is None or name == self.model_name:
            return self.model_name
        if self.loras.get(name) is not None:
            return name
        raise APIError(404, f"the model {name[:200]!r} does not exist; this server serves "
                       f"{self.model_name!r}", "model", "model_not_found")

    def check_accepting(self) -> None:
        """503 / 429 before any work is done for a request."""
        e = self.engine
        if e.state != EngineState.READY:
            if e.state == EngineState.BROKEN:
                raise APIError(503, "the engine is not running", None, "engine_dead")
            raise APIError(503, f"the server is {e.state.value}", None, "not_ready",
                           {"Retry-After": "5"})
        if not e.has_capacity():
            raise engine_error(EngineOverloadedError("too many requests are waiting; retry later"))

    @property
    def llm(self):
        """The LLMEngine; while it is not built (loading, or its load failed) a request gets
        check_accepting's 503, never an AttributeError's 500."""
        llm = self.engine.engine
        if llm is None:
            self.check_accepting()
            raise APIError(503, "the engine is not running", None, "engine_dead")
        return llm

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def new_id(self, prefix: str) -> str:
        # Unique per process and unguessable across restarts; never taken from the client.
        return f"{prefix}-{self._id_salt}{next(self._ids):x}{secrets.token_hex(4)}"

    # ----- CPU work off the event loop -----
    async def run_tokenizer(self, fn, *args):
        """Run fn(*args) on the tokenizer thread; ValueErrors become 400s."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._tok_pool, fn, *args)
        except APIError:
            raise
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise APIError(400, f"could not prepare the prompt: {e}", None,
                           "invalid_prompt") from None

    async def encode(self, prompt: str) -> list[int]:
        """Token ids of a completion prompt (same as the offline LLM)."""
        return await self.run_tokenizer(self.llm.encode_prompt, prompt)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ----- submission -----
    async def wait_final(self, request, streams: list[RequestStream]):
        """Final outputs of non-streaming requests; aborts them if the client leaves.

        Returns None when the client disconnected (there is no one to answer).
        """
        try:
            return await run_unless_disconnected(collect_final(streams), request.receive)
        except ClientDisconnected:
            return None
        except Exception as e:
            raise engine_error(e) from None
        finally:
            for s in streams:
                s.abort()

    def check_vocab(self, params: SamplingParams) -> None:
        """400 for logit_bias token ids the model does not have (the sampler would drop them)."""
        vocab = self.llm.arch.vocab_size
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise APIError(400, f"logit_bias token ids must be < {vocab}", "logit_bias",
                           "invalid_value")

    async def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                     arrival_time: float, lora: LoRARequest | None = None) -> RequestStream:
        """Queue a request (with an adapter, or the base model); engine refusals become
        APIErrors (400/429/503)."""
        self.check_vocab(params)
        try:
            return await self.engine.add_request(request_id, prompt, params, arrival_time,
                                                 lora)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise engine_error(e) from None

    async def submit_all(self, base_id: str, prompts: list[str | list[int]],
                         params: SamplingParams, arrival_time: float,
                         lora: LoRARequest | None = None) -> list[RequestStream]:
        """Queue one request per prompt; if one is refused, abort the others and raise."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.submit(rid, prompt, params, arrival_time, lora))
        except BaseException:
            for s in streams:
                s.abort()
            raise
        return streams


async def merge_streams(streams: list[RequestStream]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) pairs from several streams as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out, None))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, out, err = await queue.get()
            if err is not None:
                raise err
            yield i, out
            if out.finished:
                left -= 1
    finally:
        for t in tasks:
            t.cancel()


async def collect_final(streams: list[RequestStream]) -> list[RequestOutput]:
    """The final output of each stream (non-streaming requests)."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merge_streams(streams):
        if out.finished:
            finals[i] = out
    return finals  # type: ignore[return-value]


async def until_disconnected(receive) -> None:
    """Return when the client closes the connection (the body must have been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


# nginx's "client closed request": never seen by the client, but counted in /metrics.
CLIENT_CLOSED_STATUS = 499


async def run_unless_disconnected(coro, receive):
    """Await coro; if the client goes away first, cancel it (the caller's finally aborts the
    engine requests) and raise ClientDisconnected."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(until_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - the client is gone; nothing to report to
            pass
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()

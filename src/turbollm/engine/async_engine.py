"""AsyncLLMEngine: one background thread owns the (not thread-safe) LLMEngine; asyncio code
submits requests, streams their outputs and aborts them.

Hand-offs between the two sides:
  asyncio -> engine thread   a thread-safe inbox of ("add" | "abort" | "wake") commands,
                             drained between steps, so new requests join the running batch
  engine thread -> asyncio   one `loop.call_soon_threadsafe` per step carrying that step's
                             outputs, routed to each request's RequestStream

The model's forward pass releases the GIL for most of its time, so the event loop stays
responsive while a step runs.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from turbollm.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from turbollm.core.lora_request import LoRARequest
    from turbollm.engine.llm_engine import LLMEngine
    from turbollm.loader.peft_adapter import PeftAdapter
    from turbollm.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# How long the idle engine thread sleeps on its inbox before looking at the stop flag again.
_IDLE_WAIT_S = 0.5
# How long it waits for news after a step that had nothing to schedule.
_STALL_WAIT_S = 0.002


class EngineState(str, enum.Enum):
    LOADING = "loading"    # the model is being loaded; nothing is accepted yet
    READY = "ready"        # taking work
    DRAINING = "draining"  # finishing in-flight requests, refusing new ones (shutdown)
    BROKEN = "broken"      # the engine loop died or never loaded; nothing will be served
    STOPPED = "stopped"    # shut down cleanly


class EngineNotReadyError(RuntimeError):
    """New work refused: the engine is loading or draining (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine loop died; no request can be served any more (HTTP 500/503)."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (HTTP 429)."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown timeout) before it finished."""


@dataclass
class EngineSnapshot:
    """Engine counters copied by the engine thread after each step (read by /metrics)."""

    num_running: int = 0  # sequences in the running batch
    num_waiting: int = 0  # sequences waiting for a slot (including preempted ones)
    kv_usage: float = 0.0  # fraction of KV blocks held by running sequences
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    step_errors: int = 0
    spec_steps: int = 0  # speculative verification steps (per sequence)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    # tensor/pipeline parallelism (executor/multiproc.py): seconds in tensor-parallel
    # collectives and in pipeline receives, the slowest rank's per step, summed
    tp_comm_seconds: float = 0.0
    pp_wait_seconds: float = 0.0


def _merge_outputs(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """Fold a consumer's unread output into the newer one (text and logprobs are cumulative;
    only delta_text is per output, so deltas are concatenated)."""
    merged = [replace(n, delta_text=o.delta_text + n.delta_text)
              for o, n in zip(old.outputs, new.outputs)]
    return replace(new, outputs=merged)


class RequestStream:
    """Outputs of one request for one asyncio consumer.

    Holds at most one unread output: a newer one is merged into it, so a slow reader costs no
    memory and catches up in one read.
    """

    def __init__(self, request_id: str, engine: "AsyncLLMEngine"):
        self.request_id = request_id
        self._engine = engine
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self.finished = False  # the final output (or an error) has been delivered

    def _put(self, out: RequestOutput) -> None:
        if self.finished:
            return
        self._pending = out if self._pending is None else _merge_outputs(self._pending, out)
        self.finished = out.finished
        self._event.set()

    def _fail(self, exc: BaseException) -> None:
        if self.finished:
            return
        self._error = exc
        self.finished = True
        self._event.set()

    async def get(self) -> RequestOutput:
        """The next output (all unread progress merged); raises the request's error."""
        while self._pending is None:
            if self._error is not None:
                raise self._error
            self._event.clear()
            await self._event.wait()
        out, self._pending = self._pending, None
        return out

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[RequestOutput]:
        while True:
            out = await self.get()
            yield out
            if out.finished:
                return

    def abort(self) -> None:
        """Stop the request in the engine if it is still running (idempotent)."""
        if not self.finished:
            self._engine.abort(self.request_id)


class AsyncLLMEngine:
    """Runs an LLMEngine in a background thread and serves it to asyncio code.

    `engine` is an LLMEngine or a zero-argument factory building one (called in the engine
    thread, so the server can answer /health while the model loads).
    """

    def __init__(self, engine: "LLMEngine | Callable[[], LLMEngine]",
                 max_queued_requests: int = 256,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 max_queue_delay: float = 0.0):
        if max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if max_queue_delay < 0:
            raise ValueError("max_queue_delay must be >= 0")
        is_engine = hasattr(engine, "step")
        self._factory = None if is_engine else engine
        self.engine: LLMEngine | None = engine if is_engine else None  # type: ignore[assignment]
        self.max_queued_requests = max_queued_requests
        self.max_queue_delay = max_queue_delay  # seconds; 0 = no shedding by waiting time
        self.on_fatal = on_fatal  # called on the event loop when the engine loop dies
        self.state = EngineState.LOADING
        self.fatal_error: BaseException | None = None
        self.snapshot = EngineSnapshot()
        self.finished_listeners: list[Callable[[RequestOutput], None]] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None  # created by start() (needs the loop)
        # Event-loop side: live streams and adds waiting for the engine thread's answer.
        self._streams: dict[str, RequestStream] = {}
        self._pending_adds: dict[str, asyncio.Future] = {}
        self._idle: asyncio.Event | None = None
        # Requests submitted but not yet scheduled, with when they were submitted (oldest
        # first): bounded by max_queued_requests and max_queue_delay. Written by both threads,
        # hence the lock.
        self._queued_lock = threading.Lock()
        self._queued_since: dict[str, float] = {}
        # Prompt tokens of the requests admitted but not yet added to the engine (the inbox):
        # the backlog the engine reports after a step does not have them yet, and a burst
        # that arrives during one long step would otherwise be admitted whole.
        self._unadded_tokens: dict[str, int] = {}
        # Engine-thread side: ids added to the engine but not yet seen scheduled.
        self._unscheduled: set[str] = set()
        # Written by the engine thread after each step, read by admission: prompt tokens
        # waiting to be computed, and the recent prefill rate (tokens/s; 0 = not measured yet)
        self._backlog_tokens = 0
        self._prefill_rate = 0.0
        self._prefill_seen = (0, 0.0)  # the engine's prefill counters at the last update
        # Written by the engine thread after each step: the adapters in memory. A request
        # naming another one has its files read by add_request, in a thread, not by the engine
        # thread (a read there would stall every running stream).
        self._resident_loras: frozenset[int] = frozenset()

    # ----- lifecycle -----
    def start(self) -> None:
        """Start the engine thread (loads the model first when given a factory)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="turbollm-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the model is loaded; raises EngineDeadError if loading failed."""
        assert self._ready is not None, "start() first"
        await asyncio.wait_for(self._ready.wait(), timeout)
        if self.state == EngineState.BROKEN:
            raise EngineDeadError(f"the engine failed: {self.fatal_error!r}")

    @property
    def is_ready(self) -> bool:
        return self.state == EngineState.READY

    def has_capacity(self) -> bool:
        """True while the waiting queue takes more (a cheap check before tokenizing)."""
        return self._refusal(time.monotonic()) is None

    def _refusal(self, now: float) -> str | None:
        """Why a new request is refused (429) now, or None. Past max_queue_delay the queue
        sheds load: while the longest-waiting request has waited that long for a batch slot,
        a newcomer would wait longer still, so it is told at once to retry."""
        queued = self._queued_since
        if len(queued) >= self.max_queued_requests:
            return "too many requests are waiting; retry later"
        if self.max_queue_delay and queued:
            waited = now - next(iter(queued.values()))  # dicts keep insertion order: the oldest
            if waited > self.max_queue_delay:
                return (f"requests have waited {waited:.1f} s for a batch slot (more than "
                        f"{self.max_queue_delay:g} s); retry later")
        if self.max_queue_delay and self._prefill_rate > 0:
            # The prompts ahead take this long to prefill at the recent rate: a newcomer's
            # first token would come later than that, so it is told now rather than after
            # the oldest request has already waited too long (a burst of long prompts).
            tokens = self._backlog_tokens + sum(self._unadded_tokens.values())
            ahead = tokens / self._prefill_rate
            if ahead > self.max_queue_delay:
                return (f"{tokens} prompt tokens are ahead (~{ahead:.1f} s of prefill, more "
                        f"than {self.max_queue_delay:g} s); retry later")
        return None

    @property
    def num_queued(self) -> int:
        """Requests submitted and not yet scheduled."""
        return len(self._queued_since)

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished."""
        return len(self._streams)

    async def drain(self, timeout: float) -> int:
        """Refuse new work and wait up to `timeout` s for in-flight requests; abort the rest.

        Returns how many requests had to be aborted.
        """
        if self.state in (EngineState.READY, EngineState.LOADING):
            self.state = EngineState.DRAINING
        if self._idle is not None and self.num_in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        left = list(self._streams.values())
        for stream in left:
            stream._fail(RequestAbortedError("the server is shutting down"))
            self.abort(stream.request_id)
        return len(left)

    def stop(self, join_timeout: float = 10.0) -> None:
        """Stop the engine thread (after the current step)."""
        self._stop = True
        self._inbox.put(("wake",))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(join_timeout)
        if self.state != EngineState.BROKEN:
            self.state = EngineState.STOPPED
        if self._loop is not None:  # nothing will answer requests still waiting: fail them
            self._post(self._fail_all, RequestAbortedError("the server stopped"))

    def _fail_all(self, exc: BaseException) -> None:
        for fut in self._pending_adds.values():
            self._fail_future(fut, exc)
        for stream in self._streams.values():
            stream._fail(exc)
        self._streams.clear()
        self._update_idle()

    # ----- requests (event-loop side) -----
    def _check_accepting(self) -> None:
        if self.state == EngineState.BROKEN:
            raise EngineDeadError("the engine is not running")
        if self.state != EngineState.READY:
            raise EngineNotReadyError(f"the server is {self.state.value}")

    async def add_request(self, request_id: str, prompt: str | list[int],
                          params: "SamplingParams", arrival_time: float | None = None,
                          lora_request: "LoRARequest | None" = None) -> RequestStream:
        """Queue a request; returns its stream once the engine took it.

        Raises EngineOverloadedError / EngineNotReadyError / EngineDeadError right away, and
        the engine's RequestValidationError once the engine thread looked at the request.
        """
        self._check_accepting()
        if request_id in self._streams or request_id in self._pending_adds:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.structured_output is not None:
            await self._compile_grammar(params.structured_output)
        adapter = None
        if lora_request is not None and lora_request.lora_int_id not in self._resident_loras:
            adapter = await self.read_adapter(lora_request)
        with self._queued_lock:
            now = time.monotonic()
            refusal = self._refusal(now)
            if refusal is not None:
                raise EngineOverloadedError(refusal)
            self._queued_since[request_id] = now
            if self.max_queue_delay:  # (a text prompt's tokens are not known yet: ~4 chars each)
                self._unadded_tokens[request_id] = (len(prompt) if isinstance(prompt, list)
                                                    else len(prompt) // 4 + 1)
        assert self._loop is not None
        fut = self._loop.create_future()
        # The stream exists before the engine sees the request: its first output (or a step
        # failure) may be posted right behind the "added" answer, before this coroutine resumes.
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        self._pending_adds[request_id] = fut
        self._idle.clear()
        self._inbox.put(("add", request_id, prompt, params, arrival_time or time.monotonic(),
                         lora_request, adapter))
        if self.state == EngineState.BROKEN:  # died between the check and the put
            self._fail_future(fut, EngineDeadError("the engine is not running"))
        try:
            await fut
        except BaseException as exc:
            self._streams.pop(request_id, None)
            stream.finished = True
            if not isinstance(exc, (ValueError, EngineDeadError)):
                # Cancelled while the engine took it: make sure it does not run for no one.
                self._inbox.put(("abort", request_id))
            raise
        finally:
            self._pending_adds.pop(request_id, None)
            self._update_idle()
        return stream

    async def _compile_grammar(self, spec) -> None:
        """Compile a request's grammar on the engine's grammar threads before queueing it, so
        a bad schema is a 400 at once and a good one is cached when the engine thread
        attaches it (the event loop and the engine loop both go on meanwhile)."""
        from turbollm.engine.constrained import PARAM
        from turbollm.engine.errors import RequestValidationError
        constrained = self.engine.constrained
        try:
            await asyncio.wrap_future(constrained.manager.compile(spec))
        except ValueError as exc:  # GrammarError: the parser's message
            raise RequestValidationError(f"invalid {spec.kind} constraint: {exc}",
                                         PARAM) from None

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: "SamplingParams", arrival_time: float | None = None,
                       lora_request: "LoRARequest | None" = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; aborts it when the consumer stops early or is cancelled."""
        stream = await self.add_request(request_id, prompt, params, arrival_time, lora_request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    async def read_adapter(self, lora_request: "LoRARequest") -> "PeftAdapter":
        """An adapter's files, read in a thread (LLMEngine.read_adapter), for add_lora or a
        request: the engine thread then only installs them."""
        self._check_accepting()
        return await asyncio.to_thread(self.engine.read_adapter, lora_request)

    async def call(self, fn: Callable[["LLMEngine"], Any]) -> Any:
        """fn(engine) run on the engine thread between steps (the engine is not thread-safe):
        adapter loading and unloading. Its exception is raised here."""
        self._check_accepting()
        assert self._loop is not None
        fut = self._loop.create_future()
        self._inbox.put(("call", fn, fut))
        if self.state == EngineState.BROKEN:
            self._fail_future(fut, EngineDeadError("the engine is not running"))
        return await fut

    def _on_called(self, fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)

    def abort(self, request_id: str) -> None:
        """Abort a request (event-loop thread only); its blocks are freed before the next step."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._fail(RequestAbortedError("the request was aborted"))
        self._inbox.put(("abort", request_id))
        self._update_idle()

    def _update_idle(self) -> None:
        if self._idle is not None and not self.num_in_flight:
            self._idle.set()

    @staticmethod
    def _fail_future(fut: asyncio.Future, exc: BaseException) -> None:
        if not fut.done():
            fut.set_exception(exc)

    # ----- event-loop callbacks posted by the engine thread -----
    def _on_loaded(self) -> None:
        if self.state == EngineState.LOADING:
            self.state = EngineState.READY
        self._ready.set()

    def _on_added(self, request_id: str, exc: BaseException | None) -> None:
        fut = self._pending_adds.get(request_id)
        if fut is None or fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    def _on_outputs(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            if out.finished:
                for listener in self.finished_listeners:
                    try:
                        listener(out)
                    except Exception:  # a metrics bug must not break serving
                        log.exception("finished-request listener failed")
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._put(out)
            if out.finished:
                del self._streams[out.request_id]
        self._update_idle()

    def _on_dead(self, exc: BaseException) -> None:
        self._fail_all(EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}"))
        self._ready.set()
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _post(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # ----- the engine thread -----
    def _run(self) -> None:
        try:
            if self.engine is None:
                self.engine = self._factory()
            self._take_snapshot()
            self._post(self._on_loaded)
            idle_step = False
            while not self._stop:
                busy = self.engine.has_unfinished_requests()
                # Block on the inbox when there is nothing to run, and also, briefly, after a
                # step that ran nothing, so that a stuck queue does not spin holding the GIL.
                self._handle(self._take_commands(
                    timeout=None if not busy else _STALL_WAIT_S if idle_step else 0.0))
                if self._stop:
                    break
                if not busy:  # idle: a lost worker rank fails the engine now, not at the
                    self.engine.check_health()  # next request (cheap; rate-limited inside)
                if self.engine.has_unfinished_requests():
                    steps = self.engine.stats.steps + self.engine.stats.step_errors
                    outs = self.engine.step()
                    idle_step = steps == self.engine.stats.steps + self.engine.stats.step_errors
                    self._track_scheduled(outs)
                    if self.max_queue_delay:  # only shedding reads the estimate
                        self._update_prefill_estimate()
                    if outs:
                        self._post(self._on_outputs, outs)
                self._take_snapshot()
        except BaseException as exc:  # noqa: BLE001 - anything here means the loop is gone
            log.exception("the engine loop died")
            self.fatal_error = exc
            self.state = EngineState.BROKEN
            self._post(self._on_dead, exc)

    def _take_commands(self, timeout: float | None) -> list[tuple]:
        """Every queued command; waits up to `timeout` s for the first (None: the idle wait)."""
        cmds = []
        if timeout is None or timeout > 0:
            try:
                cmds.append(self._inbox.get(timeout=timeout or _IDLE_WAIT_S))
            except queue.Empty:
                return cmds
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                return cmds

    def _handle(self, cmds: list[tuple]) -> None:
        from turbollm.engine.errors import RequestValidationError
        for cmd in cmds:
            if cmd[0] == "call":
                _, fn, fut = cmd
                try:
                    result, exc = fn(self.engine), None
                except Exception as e:  # the caller gets it; the loop goes on
                    result, exc = None, e
                self._post(self._on_called, fut, result, exc)
            elif cmd[0] == "add":
                _, rid, prompt, params, arrival, lora, adapter = cmd
                with self._queued_lock:
                    tokens = self._unadded_tokens.pop(rid, 0)
                try:
                    self.engine.add_request(rid, prompt, params, arrival_time=arrival,
                                            lora_request=lora, adapter=adapter)
                except (RequestValidationError, ValueError) as exc:
                    self._dequeue(rid)
                    self._post(self._on_added, rid, exc)
                    continue
                except Exception as exc:  # a bug in one request must not stop the loop
                    log.exception("add_request failed for %s", rid)
                    self._dequeue(rid)
                    self._post(self._on_added, rid, exc)
                    continue
                self._unscheduled.add(rid)
                self._backlog_tokens += tokens  # (until the update after the next step)
                self._post(self._on_added, rid, None)
            elif cmd[0] == "abort":
                rid = cmd[1]
                self.engine.abort_request(rid)
                if rid in self._unscheduled:
                    self._unscheduled.discard(rid)
                    self._dequeue(rid)

    def _dequeue(self, request_id: str) -> None:
        with self._queued_lock:
            self._queued_since.pop(request_id, None)

    def _track_scheduled(self, outs: list[RequestOutput]) -> None:
        """Release queue slots of requests that left the waiting queue in this step."""
        if not self._unscheduled:
            return
        waiting = self.engine.waiting_request_ids()
        left = [rid for rid in self._unscheduled if rid not in waiting]
        for rid in left:
            self._unscheduled.discard(rid)
            self._dequeue(rid)

    def _update_prefill_estimate(self) -> None:
        """The backlog and a moving average of the prefill rate, for admission."""
        stats = self.engine.stats
        tokens = stats.prefill_tokens - self._prefill_seen[0]
        seconds = stats.prefill_seconds - self._prefill_seen[1]
        if tokens and seconds > 0:
            rate = tokens / seconds
            self._prefill_rate = rate if not self._prefill_rate else \
                0.8 * self._prefill_rate + 0.2 * rate
            self._prefill_seen = (stats.prefill_tokens, stats.prefill_seconds)
        self._backlog_tokens = self.engine.prefill_backlog()

    def _take_snapshot(self) -> None:
        e = self.engine
        if e.config.lora.enable_lora:
            self._resident_loras = frozenset(e.loaded_lora_ids())
        s = e.scheduler.stats()
        self.snapshot = EngineSnapshot(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_usage=s.kv_usage,
            num_preemptions=s.num_preemptions, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, prompt_tokens=e.stats.prompt_tokens,
            generation_tokens=e.stats.generation_tokens, steps=e.stats.steps,
            step_errors=e.stats.step_errors,
            spec_steps=e.spec.num_spec_steps if e.spec else 0,
            spec_draft_tokens=e.spec.num_draft_tokens if e.spec else 0,
            spec_accepted_tokens=e.spec.num_accepted_tokens if e.spec else 0,
            tp_comm_seconds=e.stats.extra.get("tp_comm_seconds", 0.0),
            pp_wait_seconds=e.stats.extra.get("pp_wait_seconds", 0.0))

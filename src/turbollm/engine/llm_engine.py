"""LLMEngine: requests in, one scheduled forward pass per step(), outputs back."""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace

from turbollm.config import EngineConfig
from turbollm.core.batch import ModelRunnerOutput, StepBatch, step_batch
from turbollm.core.kv_cache_manager import KVCacheManager
from turbollm.core.lora_request import LoRARequest
from turbollm.core.request import Request, RequestStatus
from turbollm.core.scheduler import Scheduler, SchedulerOutput
from turbollm.engine.constrained import ConstrainedRequests
from turbollm.engine.errors import (ContextLengthExceededError, KVCacheBusyError,
                                    ModelBrokenError, RequestValidationError)
from turbollm.engine.output_processor import OutputProcessor, RequestGroup
from turbollm.engine.outputs import RequestOutput
from turbollm.executor.uniproc import make_executor
from turbollm.loader.peft_adapter import PeftAdapter, load_peft_adapter
from turbollm.sampling_params import SamplingParams
from turbollm.spec_decode.proposer import make_speculative_decoder
from turbollm.spec_decode.step_cost import measure_step_costs

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20

POOLINGS = ("mean", "last")  # how embed() pools the final hidden states


@dataclass
class _Step:
    """A scheduled step between its launch and its landing."""

    so: SchedulerOutput
    batch: StepBatch
    num_proposed: list[int]  # each request's proposals to verify
    prefill_tokens: int
    started: float
    output: ModelRunnerOutput | None = None  # once back
    error: Exception | None = None


@dataclass
class EngineStats:
    """Counters since start, read by /metrics and the benchmarks."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    step_errors: int = 0
    # prompt tokens computed, and the seconds of the steps that computed them (with whatever
    # decodes shared those steps): the prefill rate a queue wait is predicted from
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    # steps sent while another was still in flight (pipeline parallelism's overlap)
    overlapped_steps: int = 0
    extra: dict = field(default_factory=dict)


class LLMEngine:
    """Continuous-batching engine over a paged KV cache; the executor's workers hold every
    tensor, the engine schedules."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.executor = make_executor(config)  # loads the model (and any draft)
        info = self.executor.model_info()
        self.arch, self.tokenizer, self.device = info.arch, info.tokenizer, info.device
        self.model_name, self.dtype, self.eos_token_ids = info.name, info.dtype, info.eos_token_ids
        self.load_time_s, self.system = info.load_time_s, info.system
        self.num_kv_blocks = num_blocks = self.executor.num_kv_blocks()
        self.max_model_len = self._context_length(info.max_model_len, num_blocks)
        draft_cost = self.executor.init_cache(num_blocks)
        cc = config.cache
        self.kv_manager = KVCacheManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.spec = make_speculative_decoder(config.speculative, self.max_model_len,
                                             self.executor, self.kv_manager.block_ids, draft_cost)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.max_model_len,
                                   self.spec.num_lookahead_tokens if self.spec else 0,
                                   config.lora.max_loras if config.lora.enable_lora else 0)
        self.outputs = OutputProcessor(self.tokenizer)
        self.constrained = ConstrainedRequests(
            self.tokenizer, self.arch.vocab_size, self.eos_token_ids,
            config.scheduler.structured_output_backend)
        self.stats = EngineStats()
        self._finished_ids: list[str] = []  # for the worker, with the next batch
        self._retired_loras: set[int] = set()  # unloaded adapters that requests still run
        # pipeline parallelism: steps sent whose output is not back yet (see step)
        self.steps_in_flight = (config.parallel.steps_in_flight
                                if getattr(self.executor, "pipelines", False) else 1)
        self._in_flight: deque[_Step] = deque()
        if self.spec is not None and self.spec.measures_step_costs:
            self._measure_step_costs()
        log.info("engine ready: %s on %s (%s), %d KV blocks x %d tokens, max_model_len %d, "
                 "loaded in %.1fs", self.model_name, self.device, self.dtype, num_blocks,
                 cc.block_size, self.max_model_len, self.load_time_s)

    def _context_length(self, model_len: int, num_blocks: int) -> int:
        """The context the engine serves: the model's, capped by the KV cache's capacity."""
        if num_blocks < 1:
            raise ValueError("the KV cache budget is too small for a single block")
        capacity = num_blocks * self.config.cache.block_size
        asked = self.config.model.max_model_len
        if asked and asked > capacity:
            raise ValueError(f"max_model_len {asked} exceeds the KV cache capacity of "
                             f"{capacity} tokens; raise --kv-cache-memory")
        return min(model_len, capacity)

    def _measure_step_costs(self) -> None:
        """Time verification steps for the speculation controller (spec_decode/step_cost.py),
        with speculation itself off meanwhile (no proposer runs between the timed steps), and
        leave no trace in the counters."""
        spec, self.spec = self.spec, None
        try:
            costs = measure_step_costs(self, spec.config.num_speculative_tokens)
        finally:
            self.spec = spec
        self.stats = EngineStats()
        if costs is None:
            log.warning("speculation: no room to time verification steps; assuming %s plain "
                        "steps per proposal", spec.controller.step_costs[1] - 1)
            return
        spec.set_step_costs(costs)
        log.info("speculation: a step verifying k = 0..%d proposals costs %s plain steps "
                 "(measured)", len(costs) - 1, " ".join(f"{c:.2f}" for c in costs))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(**kwargs))

    # ----- requests -----
    def encode_prompt(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestValidationError("this model has no tokenizer: pass prompt token ids",
                                         "prompt")
        return list(self.tokenizer(prompt).input_ids)

    def add_request(self, request_id: str, prompt: str | list[int] | None,
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None,
                    adapter: PeftAdapter | None = None) -> None:
        """Queue a request (a prompt string or token ids), with the base model or an adapter
        (`adapter`: its files as read_adapter read them, if it may not be in memory); raises
        RequestValidationError."""
        params = params or SamplingParams()
        if self.outputs.has(request_id):
            raise RequestValidationError(f"request id {request_id!r} is already in use")
        if lora_request is not None:
            self.add_lora(lora_request, adapter)
        text = prompt if isinstance(prompt, str) else None
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt or [])
        max_tokens = self._validate(ids, params)
        group = RequestGroup(request_id, text, ids, params, arrival_time or time.monotonic())
        leader = None
        children = []
        for i in range(params.n):
            # Prompt logprobs are the same for every child: the first one scores them.
            # seeds are 64-bit (torch's generators refuse more): the last wraps to 0
            child_params = replace(params, n=1, seed=None if params.seed is None
                                   else (params.seed + i) % 2**64,
                                   prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            child = Request(f"{request_id}#{i}", ids, child_params, self.eos_token_ids,
                            max_tokens, group.metrics.arrival_time, prefix_leader=leader,
                            lora_request=lora_request,
                            cache_salt=self._cache_salt(child_params))
            if self.config.cache.enable_prefix_caching and leader is None:
                leader = child
            children.append((child, child_params))
        if params.structured_output is not None:  # raises on a grammar known to be bad
            self.constrained.attach([c for c, _ in children], params.structured_output)
        for child, child_params in children:
            group.add_child(child, self.outputs.make_detokenizer(ids, child_params))
            self.scheduler.add_request(child)
        self.outputs.add_group(group)
        self.stats.prompt_tokens += len(ids)

    def _cache_salt(self, params: SamplingParams) -> bytes:
        """Seeded sampling requests run in batch-invariant steps (KernelConfig.batch_invariant
        'seeded'): they share prefix-cache blocks only among themselves, whose KV was computed
        row by row like theirs."""
        seeded_steps = self.config.kernel.batch_invariant == "seeded"
        return b"row-invariant" if params.seeded_sampling and seeded_steps else b""

    def _validate(self, ids: list[int], params: SamplingParams) -> int:
        if not ids:
            raise RequestValidationError("the prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= self.arch.vocab_size:
            raise RequestValidationError(
                f"prompt token ids must be in [0, {self.arch.vocab_size})", "prompt")
        if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
            raise RequestValidationError(f"logprobs must be <= {MAX_LOGPROBS}", "logprobs")
        if params.prompt_logprobs is not None and params.prompt_logprobs > MAX_LOGPROBS:
            raise RequestValidationError(f"prompt_logprobs must be <= {MAX_LOGPROBS}",
                                         "prompt_logprobs")
        room = self.max_model_len - len(ids)
        if room <= 0:
            raise ContextLengthExceededError(
                f"the prompt has {len(ids)} tokens but this model's context is "
                f"{self.max_model_len} tokens", "prompt")
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthExceededError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context length of {self.max_model_len} tokens", "max_tokens")
        return params.max_tokens if params.max_tokens is not None else room

    def _check_lora_enabled(self) -> None:
        if not self.config.lora.enable_lora:
            raise RequestValidationError("this engine serves no LoRA adapters: start it with "
                                         "enable_lora=True (--enable-lora)", "lora_request")

    @staticmethod
    def _unservable(lora_request: LoRARequest, exc: ValueError) -> RequestValidationError:
        """The one-line error for an adapter that cannot be served."""
        return RequestValidationError(f"LoRA adapter {lora_request.lora_name!r}: {exc}",
                                      "lora_request")

    def read_adapter(self, lora_request: LoRARequest) -> PeftAdapter:
        """An adapter's files, read and checked against the model. Thread-safe and touching
        no engine state: a server reads them off the engine thread (a read of a large adapter
        would stall every running stream) and passes the result to add_lora / add_request."""
        self._check_lora_enabled()
        try:
            return load_peft_adapter(lora_request.lora_path, self.arch)
        except ValueError as exc:
            raise self._unservable(lora_request, exc) from None

    def loaded_lora_ids(self) -> list[int]:
        """The adapters in memory: requests naming them read no file."""
        return self.executor.loaded_lora_ids()

    def _loras_in_use(self) -> set[int]:
        """The adapters of unfinished requests."""
        return {r.lora_request.lora_int_id for r in self.scheduler.requests.values()
                if r.lora_request is not None}

    def add_lora(self, lora_request: LoRARequest, adapter: PeftAdapter | None = None) -> None:
        """Load an adapter now (requests naming it load it anyway), from its files or from
        `adapter` (read_adapter's result); RequestValidationError says in one line why it
        cannot be served."""
        self._check_lora_enabled()
        # the adapters of unfinished requests stay in memory (max_cpu_loras or not): a step
        # would otherwise read one again, stalling every stream in it
        try:
            self.executor.add_lora(lora_request, adapter, frozenset(self._loras_in_use()))
        except ValueError as exc:
            raise self._unservable(lora_request, exc) from None
        self._retired_loras.discard(lora_request.lora_int_id)

    def remove_lora(self, lora_id: int) -> None:
        """Forget an adapter's weights once no unfinished request runs it: requests in flight
        finish with it."""
        self._retired_loras.add(lora_id)
        self._drop_retired_loras()

    def _drop_retired_loras(self) -> None:
        for lora_id in self._retired_loras - self._loras_in_use():
            self.executor.remove_lora(lora_id)
            self._retired_loras.discard(lora_id)

    def abort_request(self, request_id: str) -> None:
        """Stop a request wherever it is and free its KV blocks (unknown ids are ignored)."""
        group = self.outputs.pop_group(request_id)
        if group is None:
            return
        ids = [c.request_id for c in group.children]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        self._finished_ids.extend(ids)
        if self._retired_loras:
            self._drop_retired_loras()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def prefill_backlog(self) -> int:
        """Prompt tokens admitted but not yet computed: the waiting requests' and the
        unfinished prefills' (a prefix-cache hit may still shorten them)."""
        s = self.scheduler
        return sum(r.num_prompt_tokens - r.num_computed_tokens
                   for r in (*s.waiting, *s.running) if r.is_prefilling)

    def waiting_request_ids(self) -> set[str]:
        """Ids (as given to add_request) of requests with a sequence not yet admitted."""
        return {r.extra[0].request_id for r in self.scheduler.waiting if r.extra is not None}

    def score_logits(self, token_ids: list[int]):
        """Next-token logits at every position of `token_ids`: [len, vocab] fp32.

        Row i is the model's prediction for token i + 1 given tokens[:i + 1]. Runs outside the
        scheduler on blocks borrowed from the pool (no prefix-cache reuse, so every position is
        computed), for perplexity, agreement and calibration.
        """
        return self._on_borrowed_blocks(token_ids, self.executor.score_logits)

    def embed(self, token_ids: list[int], pooling: str = "mean",
              normalize: bool = True) -> list[float]:
        """An embedding of `token_ids`: the final hidden states pooled (`mean` over the
        positions, or the `last` position's), scaled to unit length when `normalize`. Runs
        outside the scheduler like score_logits."""
        if pooling not in POOLINGS:
            raise RequestValidationError(f"pooling must be one of {POOLINGS}, got {pooling!r}",
                                         "pooling")
        vec = self._on_borrowed_blocks(
            token_ids, lambda ids, blocks: self.executor.embed(ids, blocks, pooling))
        if normalize:
            norm = math.sqrt(sum(v * v for v in vec))
            vec = [v / norm for v in vec] if norm > 0 else vec
        return vec

    def _on_borrowed_blocks(self, token_ids: list[int], run):
        """run(token_ids, block_ids) on blocks borrowed from the pool for one sequence."""
        if not token_ids:
            raise RequestValidationError("the token list is empty", "prompt")
        if len(token_ids) > self.max_model_len:
            raise ContextLengthExceededError(
                f"{len(token_ids)} tokens exceed the context length of {self.max_model_len}",
                "prompt")
        if min(token_ids) < 0 or max(token_ids) >= self.arch.vocab_size:
            raise RequestValidationError(
                f"token ids must be in [0, {self.arch.vocab_size})", "prompt")
        pool = self.kv_manager.pool
        need = -(-len(token_ids) // self.config.cache.block_size)
        if need > pool.num_available:
            raise KVCacheBusyError(f"{len(token_ids)} tokens need {need} free KV blocks; "
                                   f"{pool.num_available} are free")
        blocks = pool.allocate(need)
        try:
            return run(list(token_ids), [b.block_id for b in blocks])
        finally:
            pool.release(blocks)

    # ----- the step -----
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, advance requests, and report what changed.

        Under pipeline parallelism up to `steps_in_flight` steps are out at once, each over its
        share of the running requests (a request is in one at a time), so that every stage
        works on one step while the next stage works on another; each call takes the oldest
        back."""
        failed = self._fail_grammars(self.constrained.poll())
        while len(self._in_flight) < self.steps_in_flight:
            launched = self._launch()
            if launched is None:
                break
            self._in_flight.append(launched)
        if not self._in_flight:
            return failed
        return failed + self._land(self._in_flight.popleft())

    def _busy(self) -> set[str]:
        """The requests of the steps in flight."""
        return {r.request_id for step in self._in_flight for r in step.so.requests}

    def _launch(self) -> _Step | None:
        """Schedule a step and send it (run it, without pipelining); None if nothing to do."""
        share = None
        if self.steps_in_flight > 1:  # this step's share of the requests (at least one)
            requests = len(self.scheduler.running) + len(self.scheduler.waiting)
            share = max(1, math.ceil(requests / self.steps_in_flight))
        so = self.scheduler.schedule(self._busy(), share)
        if so.is_empty:
            return None
        batch = step_batch(so, self._finished_ids)
        self.constrained.fill_bitmasks(so, batch)
        self._finished_ids = []
        step = _Step(so, batch, [len(r.spec_token_ids) for r in so.requests],
                     sum(min(n, max(0, r.num_prompt_tokens - r.num_computed_tokens))
                         for r, n in zip(so.requests, so.num_scheduled_tokens)),
                     time.perf_counter())
        try:
            if self.steps_in_flight > 1:
                self.stats.overlapped_steps += bool(self._in_flight)
                self.executor.submit_execute(batch)
            else:
                step.output = self.executor.execute(batch)
        except Exception as exc:  # fail only this step's requests; the engine goes on
            step.error = exc
        return step

    def _land(self, step: _Step) -> list[RequestOutput]:
        """Take a step's output back and advance its requests."""
        so, batch = step.so, step.batch
        if step.output is None and step.error is None:
            try:
                step.output = self.executor.collect_execute()
            except Exception as exc:
                step.error = exc
        if step.error is not None:
            self._finished_ids.extend(batch.finished_request_ids)  # releasing twice is harmless
            return self._fail_step(so, step.error)
        ro, prefill = step.output, step.prefill_tokens
        seconds = time.perf_counter() - step.started
        if prefill:
            self.stats.prefill_tokens += prefill
            self.stats.prefill_seconds += seconds
        if self.scheduler.stall is not None:
            self.scheduler.stall.observe(so.total_num_scheduled_tokens - prefill, prefill, seconds)
        new, finished = self.scheduler.update(so, ro.sampled_token_ids)
        self.stats.steps += 1
        if self.config.parallel.world_size > 1:  # seconds in collectives, for bench / metrics
            extra = self.stats.extra
            for key, seconds in self.executor.last_comm_stats().items():
                extra[key] = extra.get(key, 0.0) + seconds
        self.stats.generation_tokens += sum(kept for _, kept in new)
        outs = self.outputs.process(so, ro, new, finished, self.scheduler)
        released = [r.request_id for r in self.outputs.released]
        self._finished_ids.extend(released)
        if self._retired_loras and finished:
            self._drop_retired_loras()
        if self.spec is not None:
            self.spec.observe(so, ro.sampled_token_ids, step.num_proposed)
            self.spec.forget(released)
            # (not for requests in a step still in flight: their tokens are not back yet)
            busy = self._busy()
            self.spec.propose([r for r in self.scheduler.running if r.request_id not in busy])
        return outs

    def _fail_grammars(self, reqs: list[Request]) -> list[RequestOutput]:
        """Fail the groups of requests whose grammar did not compile, with the parser's words."""
        outs = []
        for req in reqs:
            group = self.outputs.pop_group(req.extra[0].request_id)
            if group is None:
                continue
            ids = [c.request_id for c in group.children]
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR)
            self._finished_ids.extend(ids)
            outs += self.outputs.fail([group], f"invalid {req.params.structured_output.kind} "
                                               f"constraint: {req.grammar.error}")
        return outs

    def _fail_step(self, so, exc: Exception) -> list[RequestOutput]:
        log.exception("engine step failed; failing its %d requests", len(so.requests))
        self.stats.step_errors += 1
        # A group with a failed child fails whole: its other children stop too.
        groups = {id(r.extra[0]): r.extra[0] for r in so.requests}.values()
        ids = [c.request_id for g in groups for c in g.children]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR)
        self._finished_ids.extend(ids)
        outs = self.outputs.fail(list(groups), f"{type(exc).__name__}: {exc}")
        self._probe_model(exc)
        return outs

    def _probe_model(self, step_exc: Exception) -> None:
        """After a failed step, one forward of a single token in a free KV block. If that fails
        too, the fault is not in the step's requests but in the model, its memory or its device:
        raise ModelBrokenError (the server goes not-ready and exits) instead of failing every
        later request one step at a time. No free block to probe with: go on serving."""
        if self.kv_manager.pool.num_available < 1:
            return
        try:
            self.score_logits([0])
        except Exception as exc:
            raise ModelBrokenError(
                f"the model fails on any input ({type(exc).__name__}: {exc}); the failed step: "
                f"{type(step_exc).__name__}: {step_exc}") from exc

    def check_health(self) -> None:
        """Between steps: raise if the executor knows a worker rank is lost (a torchrun rank
        pings its peers here when idle), so an idle server fails instead of waiting."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the executor's worker processes (tensor/pipeline parallelism; a no-op for one
        process). They also stop when the engine is collected or the interpreter exits."""
        self.executor.shutdown()

    def run_until_done(self) -> list[RequestOutput]:
        """Step until no request is left; the finished outputs in completion order."""
        done = []
        while self.has_unfinished_requests():
            done.extend(o for o in self.step() if o.finished)
        return done

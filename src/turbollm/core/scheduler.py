"""Scheduler: decides, every step, which requests run and how many tokens each (no torch).

One rule (vLLM v1): a request is given up to `num_tokens - num_computed_tokens` tokens per step
within a token budget. Chunked prefill, decode, prefix-cache hits and recompute after preemption
all follow from it, and prefill and decode tokens share one forward pass.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from turbollm.config import SchedulerConfig
from turbollm.core.kv_cache_manager import KVCacheManager
from turbollm.core.request import Request, RequestStatus
from turbollm.core.stall_budget import StallBudget

# Prompt tokens a step may add per decoding request (see Scheduler._prefill_budget)
PREFILL_TOKENS_PER_DECODE = 16


@dataclass
class SchedulerOutput:
    """What one step computes: handed from the scheduler to the model runner."""

    # Requests in batch order; their tokens are laid out back to back in the flat batch.
    requests: list[Request] = field(default_factory=list)
    # Tokens to compute for each request this step (same order as `requests`).
    num_scheduled_tokens: list[int] = field(default_factory=list)
    # Block ids of each request's KV (its block table), same order.
    block_tables: list[list[int]] = field(default_factory=list)
    # Requests preempted this step (their KV was dropped; they will recompute).
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class SchedulerStats:
    """Counters the metrics endpoint and benchmarks read."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Scheduler:
    """Continuous batching over a paged KV cache."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 num_lookahead_tokens: int = 0, max_loras: int = 0):
        self.config = config
        # Most distinct LoRA adapters among running requests (the worker's slots; 0: no limit).
        # Admission keeps to it, so every step can schedule every running request.
        self.max_loras = max_loras
        # Extra KV slots a decoding request holds beyond this step's tokens, so a draft model
        # can write its K proposals' KV after the step (speculative decoding with a draft).
        self.num_lookahead_tokens = num_lookahead_tokens
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order; the last one is preempted first
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Measured step times that size prompt chunks while others decode (the engine feeds it)
        self.stall = (StallBudget(config.max_decode_stall)
                      if config.max_decode_stall and config.enable_chunked_prefill else None)

    # ----- intake -----
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ----- the step -----
    def schedule(self, busy: frozenset[str] | set[str] = frozenset(),
                 max_requests: int | None = None) -> SchedulerOutput:
        """Pick this step's work: running requests first (decodes before prefill chunks).

        Pipeline parallelism keeps several steps in flight: `busy` are the requests in a step
        not yet back (they get no work and are never preempted meanwhile), and `max_requests`
        caps the requests this step takes (running or admitted), so that the work splits
        into about equal steps that follow each other through the stages."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        prefill_budget = self._prefill_budget()

        # Decodes are one token each: serving them before any prefill chunk means a long
        # prompt can only take the budget that is left, never stall the running streams.
        order = [r for r in self.running if not r.is_prefilling and r.request_id not in busy]
        order += [r for r in self.running if r.is_prefilling and r.request_id not in busy]
        if max_requests is not None:
            order = order[:max_requests]
        for req in order:
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = req.num_tokens - req.num_computed_tokens
            if req.spec_token_ids:  # proposals fit the budget whole or are cut, never chunked
                del req.spec_token_ids[max(0, budget - n):]
                n += len(req.spec_token_ids)
            n = min(n, budget, prefill_budget) if req.is_prefilling else min(n, budget)
            if n <= 0:
                continue
            lookahead = self._lookahead(req, req.num_computed_tokens + n)
            allocated = True
            while not self.kv.allocate_slots(req, n + lookahead):
                victim = self._pick_victim(scheduled_ids | busy)
                if victim is None:  # only requests in flight hold the blocks: not this step
                    allocated = False
                    break
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if not allocated or req.status != RequestStatus.RUNNING:
                continue
            self._add(out, req, n)
            scheduled_ids.add(req.request_id)
            budget -= n
            if req.is_prefilling:
                prefill_budget -= n

        # Admit waiting requests, unless this step had to preempt (no room anyway).
        if not out.preempted:
            self._admit_waiting(out, min(budget, prefill_budget), max_requests)
        return out

    def _prefill_budget(self) -> int:
        """Prompt tokens this step may compute. While requests decode the whole step delays
        their next token, so prompts get what keeps the step within max_decode_stall times a
        decode-only step (StallBudget, from measured step times). Before any step is timed,
        or with max_decode_stall = 0: SchedulerConfig.prefill_chunk_while_decoding tokens, or
        PREFILL_TOKENS_PER_DECODE per decoding request when that is more. Either way the
        share grows with the decoding batch, which keeps waiting prompts from starving (64
        clients on 2 SPR cores: a fixed 64-token cap took the median time to first token
        from 2.8 s to 36 s)."""
        if not self.config.enable_chunked_prefill:
            return self.config.max_num_batched_tokens
        decoding = [r for r in self.running if not r.is_prefilling]
        if not decoding:
            return self.config.max_num_batched_tokens
        if self.stall is not None:  # keyed as the engine reports steps: by decode tokens
            measured = self.stall.tokens(sum(r.num_tokens - r.num_computed_tokens
                                             + len(r.spec_token_ids) for r in decoding))
            if measured is not None:
                return measured
        cap = self.config.prefill_chunk_while_decoding
        if not cap:
            return self.config.max_num_batched_tokens
        return max(cap, PREFILL_TOKENS_PER_DECODE * len(decoding))

    def _admit_waiting(self, out: SchedulerOutput, budget: int, max_requests: int | None) -> None:
        skipped: list[Request] = []
        loras = self.running_lora_ids()
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and (max_requests is None or len(out.requests) < max_requests)):
            req = self.waiting[0]
            leader = req.prefix_leader
            if leader is not None and not leader.is_finished and leader.is_prefilling:
                # n > 1: wait until the leader's prompt blocks are cached, then share them.
                skipped.append(self.waiting.popleft())
                continue
            if req.grammar is not None and not req.grammar.ready:
                # its grammar is still compiling (engine thread pool): the others go first
                skipped.append(self.waiting.popleft())
                continue
            lora = req.lora_request
            if (lora is not None and self.max_loras and lora.lora_int_id not in loras
                    and len(loras) >= self.max_loras):
                # every adapter slot is taken by running requests: wait for one to free up
                skipped.append(self.waiting.popleft())
                continue
            hits, num_hit = self.kv.get_computed_blocks(req)
            n = req.num_tokens - num_hit
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.kv.allocate_slots(req, n + self._lookahead(req, num_hit + n), hits):
                break
            self.waiting.popleft()
            if lora is not None:
                loras.add(lora.lora_int_id)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add(out, req, n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def running_lora_ids(self) -> set[int]:
        """The adapters of running requests (at most max_loras of them)."""
        return {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}

    def _lookahead(self, req: Request, end: int) -> int:
        """Draft slots for a request whose step ends at `end` (= decoding after the step)."""
        if not self.num_lookahead_tokens or end < req.num_tokens:
            return 0
        return max(0, min(self.num_lookahead_tokens, self.max_model_len - end))

    def _add(self, out: SchedulerOutput, req: Request, n: int) -> None:
        out.requests.append(req)
        out.num_scheduled_tokens.append(n)
        out.block_tables.append(self.kv.block_ids(req.request_id))

    def _pick_victim(self, spared: set[str]) -> Request | None:
        """The most recently admitted running request not already given work this step (nor
        in a step in flight); None when there is none (the current one is a candidate unless
        it is spared)."""
        for req in reversed(self.running):
            if req.request_id not in spared:
                return req
        return None

    def _preempt(self, req: Request) -> None:
        """Drop a request's KV (recompute later) and put it first in line."""
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.draft_num_computed = 0
        req.clear_spec()
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ----- after the forward pass -----
    def update(self, out: SchedulerOutput, sampled_token_ids: list
               ) -> tuple[list[tuple[Request, int]], list[Request]]:
        """Advance each scheduled request by its new tokens.

        `sampled_token_ids[i]` holds the tokens `out.requests[i]` gained this step: a list (a
        speculative step yields its accepted proposals plus one token), a single int, or
        None / [] for a partial prefill chunk. Returns ((request, number of new tokens kept),
        ...) and the finished requests; tokens after a stop are dropped.
        """
        with_new_tokens, finished = [], []
        for req, n, tokens in zip(out.requests, out.num_scheduled_tokens, sampled_token_ids):
            if req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            tokens = [] if tokens is None else [tokens] if isinstance(tokens, int) else tokens
            num_spec = len(req.spec_token_ids)
            req.clear_spec()
            if num_spec and tokens:
                # KV of rejected proposals is dead: those slots are overwritten later.
                n -= num_spec - (len(tokens) - 1)
                req.num_spec_steps += 1
                req.num_draft_tokens += num_spec
                req.num_accepted_tokens += len(tokens) - 1
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.num_tokens or not tokens:
                self.kv.cache_full_blocks(req)
                continue  # a prefill chunk: nothing sampled yet
            kept, stopped = 0, False
            for token in tokens:
                req.append_output_token(token)
                kept += 1
                stopped = req.check_stop()
                if not stopped and req.num_tokens >= self.max_model_len:
                    req.status = RequestStatus.FINISHED_LENGTH
                    stopped = True
                if stopped:
                    break
            # The last token's KV is computed next step (a stop may also cut accepted ones).
            req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
            self.kv.cache_full_blocks(req)
            with_new_tokens.append((req, kept))
            if stopped:
                self._remove_finished(req)
                finished.append(req)
        return with_new_tokens, finished

    def finish_requests(self, request_ids, status: RequestStatus) -> list[Request]:
        """Finish (stop string, abort, error) requests wherever they are; frees their blocks."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._remove_finished(req)
            done.append(req)
        return done

    def _remove_finished(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        self.kv.free(req)
        self.requests.pop(req.request_id, None)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            kv_usage=self.kv.usage, num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.kv.prefix_queries, prefix_cache_hits=self.kv.prefix_hits)

"""Turns scheduler/runner results into RequestOutputs: detokenize, stop strings, logprobs, n>1."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from turbollm.engine.outputs import (CompletionOutput, PositionLogprobs, RequestMetrics,
                                     RequestOutput, TokenLogprob)
from turbollm.core.request import Request, RequestStatus


@dataclass
class ChildState:
    """Per generated sequence: its detokenizer and accumulated logprobs."""

    request: Request
    detok: object | None
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float = 0.0


@dataclass
class RequestGroup:
    """A user request and its n child sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: object
    arrival_time: float
    children: list[Request] = field(default_factory=list)
    states: list[ChildState] = field(default_factory=list)
    metrics: RequestMetrics = field(init=False)
    error: str | None = None
    # params.prompt_logprobs: None for the first prompt token, then one entry per prompt token
    # as the prefill scores them (by the first child only).
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    def add_child(self, req: Request, detok) -> None:
        wants_lp = req.params.logprobs is not None
        self.children.append(req)
        self.states.append(ChildState(req, detok, [] if wants_lp else None))
        req.extra = (self, len(self.children) - 1)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


def to_position_logprobs(lp, tokenizer) -> PositionLogprobs:
    """Convert the sampler's per-row logprobs into the public structure."""
    def tl(tid, logprob, rank):
        text = tokenizer.convert_ids_to_tokens(int(tid)) if tokenizer is not None else None
        return TokenLogprob(int(tid), float(logprob), int(rank), text)

    top = [tl(t, l, r + 1) for r, (t, l) in enumerate(lp.top)]
    return PositionLogprobs(tl(lp.token_id, lp.logprob, lp.rank), top)


class OutputProcessor:
    """Owns request groups and produces each step's outputs."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.groups: dict[str, RequestGroup] = {}
        self.released: list[Request] = []  # children finished in the last process() call

    def has(self, request_id: str) -> bool:
        return request_id in self.groups

    def add_group(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group

    def pop_group(self, request_id: str) -> RequestGroup | None:
        return self.groups.pop(request_id, None)

    def make_detokenizer(self, prompt_ids, params):
        if self.tokenizer is None or not params.detokenize:
            return None
        from turbollm.engine.detokenizer import IncrementalDetokenizer
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params)

    def process(self, so, ro, new: list[Request], finished: list[Request], scheduler
                ) -> list[RequestOutput]:
        now = time.monotonic()
        self.released = list(finished)
        changed: dict[str, RequestGroup] = {}
        lp_of = {id(r): lp for r, lp in zip(so.requests, ro.logprobs) if lp is not None}
        if ro.prompt_logprobs is not None:
            self._add_prompt_logprobs(so.requests, ro.prompt_logprobs)
        for req in so.requests:
            group = req.extra[0] if req.extra else None
            if group is not None and group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
        for req, kept in new:
            group, idx = req.extra
            state = group.states[idx]
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
                group.metrics.num_cached_tokens = max(req.num_cached_tokens, 0)
            lps = lp_of.get(id(req))
            first = req.num_output_tokens - kept
            for j in range(kept):
                if lps is not None and state.logprobs is not None and j < len(lps):
                    pos = to_position_logprobs(lps[j], self.tokenizer)
                    state.logprobs.append(pos)
                    state.cumulative_logprob += pos.sampled.logprob
                if state.detok is not None:
                    # EOS / stop token ids end the request and leave their text out.
                    last = j == kept - 1
                    by_token = last and req.status == RequestStatus.FINISHED_STOPPED
                    stop = state.detok.update([req.output_token_ids[first + j]],
                                              stop_terminated=by_token)
                    if stop is not None:
                        self._stop_on_string(req, stop, scheduler, first + j + 1)
                        break
            changed[group.request_id] = group
        for req in finished:
            group = req.extra[0]
            changed[group.request_id] = group
        return [self._make_output(g, now) for g in changed.values()]

    def _add_prompt_logprobs(self, requests: list[Request], found: list) -> None:
        for req, lps in zip(requests, found):
            if lps:
                req.extra[0].prompt_logprobs.extend(
                    to_position_logprobs(lp, self.tokenizer) for lp in lps)
                req.num_prompt_logprobs += len(lps)

    def _stop_on_string(self, req: Request, stop: str, scheduler, num_outputs: int) -> None:
        # Tokens a speculative step accepted after the stop string are not part of the output.
        del req.output_token_ids[num_outputs:]
        del req.all_token_ids[req.num_prompt_tokens + num_outputs:]
        if not req.is_finished:
            scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            self.released.append(req)
        req.status = RequestStatus.FINISHED_STOPPED  # a stop string beats a length finish
        req.stop_reason = stop

    def fail(self, groups: list[RequestGroup], message: str) -> list[RequestOutput]:
        """Final outputs (finish_reason 'error') for groups the engine could not run."""
        now = time.monotonic()
        self.released = []
        for g in groups:
            g.error = message
        return [self._make_output(g, now) for g in groups]

    def _make_output(self, group: RequestGroup, now: float) -> RequestOutput:
        finished = group.finished
        m = group.metrics
        m.spec_steps = sum(c.num_spec_steps for c in group.children)
        m.spec_draft_tokens = sum(c.num_draft_tokens for c in group.children)
        m.spec_accepted_tokens = sum(c.num_accepted_tokens for c in group.children)
        outs = []
        for i, (req, st) in enumerate(zip(group.children, group.states)):
            text, delta = "", ""
            if st.detok is not None:
                delta = st.detok.get_next_delta(streaming=not req.is_finished,
                                                finished=req.is_finished)
                text = st.detok.output_text
            outs.append(CompletionOutput(
                index=i, text=text, token_ids=list(req.output_token_ids),
                cumulative_logprob=st.cumulative_logprob if st.logprobs is not None else None,
                logprobs=list(st.logprobs) if st.logprobs is not None else None,
                finish_reason=req.finish_reason, stop_reason=req.stop_reason, delta_text=delta))
        if finished:
            group.metrics.finished_time = now
            group.metrics.num_preemptions = sum(c.num_preemptions for c in group.children)
            self.groups.pop(group.request_id, None)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs,
                             finished, group.metrics, error=group.error,
                             prompt_logprobs=(list(group.prompt_logprobs)
                                              if group.prompt_logprobs is not None else None),
                             lora_request=group.children[0].lora_request if group.children
                             else None)

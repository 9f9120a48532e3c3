"""The engine's side of constrained decoding: give requests their grammar states, fail those
whose grammar does not compile, and hand the step's bitmasks to the worker with the batch.

Masks are filled here, beside the scheduler (as in vLLM V1's engine core), not in the worker:
the matchers follow the scheduler's accepted tokens, and the worker gets plain int32 arrays.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from turbollm.engine.errors import RequestValidationError
from turbollm.structured_output import StructuredOutputManager

if TYPE_CHECKING:
    from turbollm.core.batch import StepBatch
    from turbollm.core.request import Request
    from turbollm.core.scheduler import SchedulerOutput
    from turbollm.structured_spec import StructuredOutputSpec

# The API field a grammar error points at (OpenAI's name for the constraint).
PARAM = "response_format"


class ConstrainedRequests:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], backend: str):
        self._args = (tokenizer, vocab_size, list(stop_token_ids), backend)
        self._manager: StructuredOutputManager | None = None
        self._lock = threading.Lock()  # the server's event loop and the engine thread both ask
        self._pending: list[Request] = []  # admitted to the scheduler, grammar compiling

    @property
    def manager(self) -> StructuredOutputManager:
        """Built on first use: engines that never see a constrained request load no backend."""
        with self._lock:
            if self._manager is None:
                tokenizer, vocab, stops, backend = self._args
                if tokenizer is None:
                    raise RequestValidationError(
                        "structured output needs the model's tokenizer", PARAM)
                self._manager = StructuredOutputManager(tokenizer, vocab, stops, backend)
            return self._manager

    def validate(self, spec: "StructuredOutputSpec") -> None:
        """Compile `spec` now (blocking the caller; cached); RequestValidationError if bad."""
        try:
            self.manager.compile(spec).result()
        except ValueError as exc:  # GrammarError: the parser's message
            raise RequestValidationError(f"invalid {spec.kind} constraint: {exc}",
                                         PARAM) from None

    def attach(self, children: list["Request"], spec: "StructuredOutputSpec") -> None:
        """Give each child its grammar state; a grammar known to be bad raises at once."""
        states = [self.manager.new_state(spec) for _ in children]
        if states[0].error is not None:
            raise RequestValidationError(f"invalid {spec.kind} constraint: {states[0].error}",
                                         PARAM)
        for child, state in zip(children, states):
            child.grammar = state
            if not state.ready:
                self._pending.append(child)

    def poll(self) -> list["Request"]:
        """Requests whose grammar finished compiling and failed (the rest become admissible)."""
        if not self._pending:
            return []
        failed, still = [], []
        for req in self._pending:
            if req.is_finished:
                continue
            if not req.grammar.poll():
                still.append(req)
            elif req.grammar.error is not None:
                failed.append(req)
        self._pending = still
        return failed

    def fill_bitmasks(self, so: "SchedulerOutput", batch: "StepBatch") -> None:
        """Attach each sampled constrained request's next-token bitmask to its work item."""
        if self._manager is None:  # no constrained request ever: nothing to look at
            return
        grammars = [r.grammar for r in so.requests]
        if not any(g is not None for g in grammars):
            return
        masks = self._manager.fill_bitmasks(grammars, [s.sample for s in batch.sequences])
        for work, mask in zip(batch.sequences, masks):
            work.grammar_bitmask = mask

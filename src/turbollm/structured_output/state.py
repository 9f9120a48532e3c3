"""GrammarState: one request's constraint, from "compiling" to a live matcher.

The engine polls a waiting request's state each step (the scheduler admits it only once
`ready`); after that the matcher follows the request's accepted tokens one by one. A
preemption keeps the output tokens (they are recomputed, not resampled), so the matcher
needs no rollback: its position is always "after every output token"."""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np

from turbollm.structured_output.backend import GrammarBackend, Matcher


class GrammarState:
    def __init__(self, compiled: "Future[Any]", backend: "Future[GrammarBackend]"):
        self._compiled = compiled
        self._backend = backend
        self.ready = False  # compiled and matched: the scheduler may admit the request
        self.error: str | None = None  # the compile failed: the request fails with this
        self.matcher: Matcher | None = None
        self.num_accepted = 0  # output tokens the matcher has taken (checked by tests)
        self.num_masks = 0  # bitmasks filled for the sampler (checked by tests)

    def poll(self) -> bool:
        """Resolve the compile if it is done; True once ready or failed."""
        if self.ready or self.error is not None:
            return True
        if not self._compiled.done():
            return False
        exc = self._compiled.exception()
        if exc is not None:
            self.error = str(exc)
        else:
            self.matcher = self._backend.result().matcher(self._compiled.result())
            self.ready = True
        return True

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar refuses it (a bug upstream)."""
        self.num_accepted += 1
        return self.matcher.accept(token_id)

    def fill_bitmask(self, out: np.ndarray) -> None:
        self.num_masks += 1
        self.matcher.fill_bitmask(out)

    def is_terminated(self) -> bool:
        return self.matcher is not None and self.matcher.is_terminated()

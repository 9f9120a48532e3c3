"""StructuredOutputManager: compiles grammars on a thread pool (never on the engine loop),
caches them by spec, and fills the step's token bitmasks for the constrained requests."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from turbollm.structured_output.backend import BITMASK_DTYPE, GrammarBackend, bitmask_words
from turbollm.structured_output.registry import make_backend
from turbollm.structured_output.state import GrammarState
from turbollm.structured_spec import StructuredOutputSpec

log = logging.getLogger(__name__)

# Compiled grammars kept (a JSON schema's is ~10-100 KB); failures are cached too, so a client
# repeating a bad schema gets its 400 without another compile.
CACHE_SIZE = 512
COMPILE_THREADS = 2


class StructuredOutputManager:
    """Thread-safe: the server's event loop compiles (to answer 400 before queueing) and the
    engine thread attaches states, on the same cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 backend: str = "xgrammar", cache_size: int = CACHE_SIZE):
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.backend_name = backend
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="turbollm-grammar")
        # The backend scans the vocabulary once (~0.1-0.3 s): started now, off the caller.
        self._backend: Future[GrammarBackend] = self._pool.submit(
            make_backend, backend, tokenizer, vocab_size, stop_token_ids)
        self._cache: OrderedDict[StructuredOutputSpec, Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputSpec) -> Future:
        """The compiled grammar of `spec`, as a future (done at once on a cache hit)."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None:
                self._cache.move_to_end(spec)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[spec] = fut
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return fut

    def _compile(self, spec: StructuredOutputSpec) -> Any:
        return self._backend.result().compile(spec)

    def new_state(self, spec: StructuredOutputSpec) -> GrammarState:
        """A request's grammar state (compiling in the background, or ready from the cache)."""
        state = GrammarState(self.compile(spec), self._backend)
        state.poll()
        return state

    def fill_bitmasks(self, grammars: Sequence[GrammarState | None], sample: Sequence[bool]
                      ) -> list[np.ndarray | None]:
        """The next-token bitmask (int32 [words]) of each sampled constrained request, None
        for the rest (unconstrained rows get nothing, and pay nothing in the sampler)."""
        out: list[np.ndarray | None] = [None] * len(grammars)
        for i, (g, s) in enumerate(zip(grammars, sample)):
            if g is not None and s:
                row = np.empty(self.words, dtype=BITMASK_DTYPE)
                g.fill_bitmask(row)
                out[i] = row
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

"""llguidance backend: compiles lazily (a schema costs ~1-2 ms to set up) but fills each mask
by walking the token trie (~130 us mean per token on the bundled SmolLM2 tokenizer, ~20x
xgrammar's); offered for grammars xgrammar rejects or compiles slowly."""
from __future__ import annotations

from typing import Any

import numpy as np

from turbollm.structured_output.backend import GrammarError, choice_grammar, clean_message
from turbollm.structured_spec import StructuredOutputSpec


# The same separators as the xgrammar backend (", " and ": ", no free whitespace), so the
# backend choice does not change the output.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class LLGuidanceMatcher:
    def __init__(self, matcher: Any, stop_token_ids: set[int]):
        self._m = matcher
        self._stops = stop_token_ids
        self._took_stop = False

    def accept(self, token_id: int) -> bool:
        self._took_stop = token_id in self._stops
        return bool(self._m.consume_token(token_id))

    def fill_bitmask(self, out: np.ndarray) -> None:
        import llguidance.numpy as lnp
        lnp.fill_next_token_bitmask(self._m, out.reshape(1, -1), 0)

    def is_terminated(self) -> bool:
        # llguidance stops as soon as nothing but a stop token may follow; we finish on the
        # stop token itself, like xgrammar, because the engine leaves a finishing token's text
        # out of the answer only when it is a stop token (the mask allows only that token then)
        return self._took_stop and bool(self._m.is_stopped())


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        import llguidance
        import llguidance.hf
        self._llg = llguidance
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=list(stop_token_ids) or None)
        self._stops = set(stop_token_ids)

    def _grammar(self, spec: StructuredOutputSpec) -> str:
        m = self._llg.LLMatcher
        if spec.kind == "json":
            return m.grammar_from_json_schema(spec.value, defaults=_COMPACT)
        if spec.kind == "json_object":
            return m.grammar_from_json_schema('{"type": "object"}',
                                              defaults=_COMPACT)
        if spec.kind == "regex":
            return m.grammar_from_regex(spec.value)
        text = choice_grammar(spec.value) if spec.kind == "choice" else spec.value
        return self._llg.grammar_from("gbnf", text)  # GBNF (or Lark) text

    def compile(self, spec: StructuredOutputSpec) -> Any:
        try:
            grammar = self._grammar(spec)
        except Exception as e:
            raise GrammarError(clean_message(e)) from None
        # llguidance compiles on first use; a throwaway matcher surfaces errors now.
        probe = self._llg.LLMatcher(self._tokenizer, grammar)
        if probe.is_error():
            raise GrammarError(clean_message(probe.get_error()))
        return grammar

    def matcher(self, compiled: Any) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._llg.LLMatcher(self._tokenizer, compiled), self._stops)

"""The grammar-engine interface the manager uses: compile a spec once, then make a matcher per
request. Backends wrap a library (xgrammar, llguidance); the rest of the engine sees only this."""
from __future__ import annotations

import re
from typing import Any, Protocol

import numpy as np

from turbollm.structured_spec import StructuredOutputSpec

# Token bitmasks are int32 words: bit j of word w allows token 32 * w + j (xgrammar's and
# llguidance's layout, so a matcher fills our rows directly).
BITMASK_DTYPE = np.int32

# C++ parsers prefix their messages with "[hh:mm:ss] /path/file.cc:123: "; the client needs
# only the rest.
_SOURCE_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")


class GrammarError(ValueError):
    """A spec the grammar engine refuses (bad schema, regex or grammar): the parser's words."""


def clean_message(exc: BaseException) -> str:
    """The parser's message without C++ source locations, on one line."""
    text = _SOURCE_PREFIX.sub("", str(exc)).strip()
    return " ".join(text.split()) or type(exc).__name__


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class Matcher(Protocol):
    """One request's position in its grammar."""

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it."""

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the allowed next tokens into `out` (int32 [bitmask_words(vocab)])."""

    def is_terminated(self) -> bool:
        """True once the grammar accepted a stop token: the output is complete."""


class GrammarBackend(Protocol):
    """A grammar library bound to one tokenizer."""

    name: str

    def compile(self, spec: StructuredOutputSpec) -> Any:
        """A compiled grammar for `spec`; raises GrammarError with the parser's message."""

    def matcher(self, compiled: Any) -> Matcher:
        """A fresh matcher at the start of `compiled`."""


def choice_grammar(options: tuple[str, ...]) -> str:
    """EBNF for exactly one of `options` (JSON string escapes are valid EBNF literals)."""
    import json
    return "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)

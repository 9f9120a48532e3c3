"""StructuredOutputSpec: what shape a request's output must take (a JSON schema, any JSON object,
a regex, one of some strings, or an EBNF/GBNF grammar). Plain values only, hashable, so the
spec is its own grammar-cache key and crosses process boundaries as it is.

Size and nesting limits are checked here, before anything is compiled: a schema too large or
too deep is refused at once, without reaching the grammar compiler.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# Bounds on what a client may ask the grammar compiler to build (characters of the spec as
# JSON text, and nesting of objects/arrays in a schema).
MAX_SPEC_CHARS = 64 * 1024
MAX_SCHEMA_DEPTH = 24
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputSpec:
    """One constraint. `value`: the schema as canonical JSON text (kind "json"), the regex or
    grammar text, a tuple of choices, or None (kind "json_object")."""

    kind: str
    value: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured_output kind must be one of {KINDS}, got {self.kind!r}")
        v = self.value
        if self.kind == "json_object":
            if v is not None:
                raise ValueError("structured_output json_object takes no value")
        elif self.kind == "choice":
            if (not isinstance(v, tuple) or not v or len(v) > MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in v)):
                raise ValueError(f"structured_output choice must be 1 to {MAX_CHOICES} "
                                 "non-empty strings")
            if sum(map(len, v)) > MAX_SPEC_CHARS:
                raise ValueError(f"structured_output choices exceed {MAX_SPEC_CHARS} characters")
        else:
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"structured_output {self.kind} must be a non-empty string")
            if len(v) > MAX_SPEC_CHARS:
                raise ValueError(f"structured_output {self.kind} is {len(v)} characters; at "
                                 f"most {MAX_SPEC_CHARS} are allowed")

    # ----- constructors (the usual ways to say it) -----
    @classmethod
    def json(cls, schema: dict | str | bool) -> "StructuredOutputSpec":
        """A JSON schema (a dict, JSON text, or True for any JSON value)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        depth = _depth(schema)
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the JSON schema nests {depth} levels deep; at most "
                             f"{MAX_SCHEMA_DEPTH} are allowed")
        # Compact text as the cache key; key order is kept: it is the order fields are generated.
        return cls("json", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> "StructuredOutputSpec":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "StructuredOutputSpec":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> "StructuredOutputSpec":
        if not isinstance(options, (list, tuple)):
            raise ValueError("structured_output choice must be a list of strings")
        return cls("choice", tuple(options))

    @classmethod
    def grammar(cls, text: str) -> "StructuredOutputSpec":
        """An EBNF grammar (GBNF: llama.cpp's dialect) with a `root` rule."""
        return cls("grammar", text)

    def schema(self) -> Any:
        """The JSON schema (kind "json")."""
        return json.loads(self.value) if self.kind == "json" else None


def _depth(node: Any, level: int = 0) -> int:
    """Nesting depth of dicts/lists in `node` (iterative bound: stops counting past the limit)."""
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(node, dict):
        return max((_depth(v, level + 1) for v in node.values()), default=level + 1)
    if isinstance(node, list):
        return max((_depth(v, level + 1) for v in node), default=level + 1)
    return level

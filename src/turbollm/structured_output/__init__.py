"""Constrained decoding: grammars compiled off the engine loop, one matcher per request, and
the token bitmask the sampler applies to just the constrained rows (structured_output/README in
docs/structured_output.md)."""
from turbollm.structured_output.backend import GrammarError
from turbollm.structured_output.manager import StructuredOutputManager
from turbollm.structured_output.state import GrammarState

__all__ = ["GrammarError", "GrammarState", "StructuredOutputManager"]

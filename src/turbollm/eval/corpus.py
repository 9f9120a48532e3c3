"""The built-in evaluation corpus: Python's own documentation topics (`pydoc_data.topics`).

It ships with every CPython, so perplexity numbers are reproducible offline on any machine.
"""
from __future__ import annotations


def builtin_corpus_text(max_chars: int | None = None) -> str:
    """The topics' texts joined in sorted-key order (stable across runs), optionally cut."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return text if max_chars is None else text[:max_chars]

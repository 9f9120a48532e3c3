"""The built-in evaluation corpus: Python's own documentation topics (`pydoc_data.topics`).

It ships with every CPython, so perplexity numbers are reproducible offline on any machine.
"""
from __future__ import annotations


def builtin_corpus_text(max_chars: int | None = None) -> str:
    """The topics' texts joined in sorted-key order (stable across runs), optionally cut."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return text if max_chars is None else text[:max_chars]


def corpus_token_ids(tokenizer, text: str | None = None, max_tokens: int | None = None
                     ) -> list[int]:
    """Token ids of `text` (default: the built-in corpus), at most `max_tokens` of them.

    Only a prefix of the text is tokenized when a limit is given (tokens are rarely longer than
    16 characters), so a small evaluation does not pay for the whole corpus.
    """
    text = builtin_corpus_text() if text is None else text
    if max_tokens is not None:
        text = text[:max_tokens * 16]
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    return ids if max_tokens is None else ids[:max_tokens]


def corpus_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` distinct `length`-token prompts cut at spread-out places of the built-in corpus."""
    import random
    ids = corpus_token_ids(tokenizer, max_tokens=max(count * length * 4, 20000))
    if len(ids) < length + 1:
        raise ValueError(f"the corpus has only {len(ids)} tokens, fewer than {length}")
    rng = random.Random(seed)
    starts = sorted(rng.sample(range(len(ids) - length), count)) if count <= len(ids) - length \
        else [rng.randrange(len(ids) - length) for _ in range(count)]
    return [ids[s:s + length] for s in starts]

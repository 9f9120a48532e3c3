"""Logprobs in the OpenAI completions and chat formats."""
from __future__ import annotations

import math

from turbollm.engine.outputs import PositionLogprobs

# JSON has no -Infinity; a token the model gives zero probability gets this (vLLM does the same).
_MIN_LOGPROB = -9999.0


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _MIN_LOGPROB


class TokenText:
    """Text of single token ids (cached: the vocabulary is finite)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) \
                if self.tokenizer is not None else str(token_id)
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text


def completion_logprobs(positions: list[PositionLogprobs], text_of: TokenText,
                        offset: int = 0, prompt: list[PositionLogprobs | None] | None = None,
                        prompt_ids: list[int] | None = None) -> dict:
    """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` of /v1/completions.

    With `prompt` (echo), the prompt's tokens come first, from offset 0; its first token has
    null logprobs, since nothing predicts it. `offset` is where the completion's text starts.
    """
    tokens, token_lps, tops, offsets = [], [], [], []
    if prompt is not None:
        at = 0
        for tid, pos in zip(prompt_ids, prompt):
            tok = text_of(tid)
            tokens.append(tok)
            token_lps.append(_finite(pos.sampled.logprob) if pos is not None else None)
            tops.append({text_of(t.token_id): _finite(t.logprob) for t in pos.top}
                        if pos is not None else None)
            offsets.append(at)
            at += len(tok)
    for pos in positions:
        tok = text_of(pos.sampled.token_id)
        tokens.append(tok)
        token_lps.append(_finite(pos.sampled.logprob))
        tops.append({text_of(t.token_id): _finite(t.logprob) for t in pos.top})
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def _chat_entry(token_id: int, logprob: float, text_of: TokenText) -> dict:
    tok = text_of(token_id)
    return {"token": tok, "logprob": _finite(logprob), "bytes": list(tok.encode("utf-8"))}


def chat_logprobs(positions: list[PositionLogprobs], text_of: TokenText) -> dict:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}` of chat completions."""
    content = []
    for pos in positions:
        entry = _chat_entry(pos.sampled.token_id, pos.sampled.logprob, text_of)
        entry["top_logprobs"] = [_chat_entry(t.token_id, t.logprob, text_of) for t in pos.top]
        content.append(entry)
    return {"content": content}

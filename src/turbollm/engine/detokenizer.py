"""Incremental detokenization with stop strings, one IncrementalDetokenizer per request.

Each update decodes only a short window of token ids: `ids[prefix:read]` (tokens already
turned into text, kept as context) and `ids[prefix:]` (the same plus the new ones); the new
text is the difference. Context matters because a token's text can depend on its neighbours
(SentencePiece drops the leading space of the first token; byte-level BPE splits one UTF-8
character over several tokens). While the window's text ends in U+FFFD the last character is
incomplete, so nothing is emitted until a later token completes it.

Never applies `clean_up_tokenization_spaces` (it is not incremental; vLLM does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from turbollm.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens used as decoding context for the first output tokens.
_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 bytes; a window this long that still ends in U+FFFD holds
# invalid bytes (or a literal U+FFFD), so emit it rather than grow the window forever.
_MAX_PENDING_TOKENS = 8
# Drop decoded ids from the front of the window list once this many are dead.
_TRIM_IDS_AT = 1024


class IncrementalDetokenizer:
    """Turns a request's output token ids into text step by step and finds stop strings."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self._stops = list(params.stop)
        self._max_stop = params.max_stop_len
        # A stop string that will be cut from the output must not be streamed before it is
        # known; when it stays in the output (include_stop_str_in_output) nothing is held.
        cut_stop = bool(self._stops) and not params.include_stop_str_in_output
        self._hold = self._max_stop - 1 if cut_stop else 0
        self._skip_special = params.skip_special_tokens
        # Fast tokenizers' Rust decoder skips the Python wrapper's per-call overhead.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        # HF slow-tokenizer semantics of spaces_between_special_tokens: added tokens that are
        # kept in the text are separated from their neighbours by one space.
        self._spaced_ids: frozenset[int] = frozenset()
        if params.spaces_between_special_tokens:
            added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
            skip = self._skip_special
            self._spaced_ids = frozenset(
                i for i, t in added.items() if not (skip and getattr(t, "special", False))
            )

        ctx = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if ctx and self._decode(ctx).endswith(_REPLACEMENT_CHAR):
            ctx = []  # prompt ends mid-character: its bytes cannot be split off the output
        self._ids: list[int] = ctx  # window source: prompt context + output ids not yet trimmed
        self._prefix = 0  # ids[prefix:read] is decoded context
        self._read = len(ctx)  # ids[read:] are not yet turned into text

        self._chunks: list[str] = []  # output text, in pieces (appending stays O(new))
        self._len = 0  # total chars in _chunks
        self._sent = 0  # chars already returned by get_next_delta
        self.num_output_tokens = 0
        self.stop_reason: str | None = None  # the stop string that ended the request
        self.finished = False

    # ---- public API ------------------------------------------------------------------------

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str | None:
        """Append tokens; return the matched stop string (text truncated at it) or None.

        `stop_terminated`: the last id is an EOS / stop_token_id that ended the request; its
        text is left out unless include_stop_str_in_output.
        """
        if self.finished or not new_token_ids:
            return None
        self.num_output_tokens += len(new_token_ids)
        if not self.params.detokenize:
            return None
        ids = list(new_token_ids)
        if stop_terminated and not self.params.include_stop_str_in_output:
            ids = ids[:-1]
        before = self._len
        for tok in ids:
            self._ids.append(tok)
            self._append(self._decode_step(force=False))
        return self._check_stop(self._len - before)

    def finish(self) -> None:
        """Mark the request finished (EOS, length, abort): flush held-back bytes and text."""
        if self.finished:
            return
        if self.params.detokenize and self._read < len(self._ids):
            before = self._len
            self._append(self._decode_step(force=True))
            self._check_stop(self._len - before)
        self.finished = True

    @property
    def output_text(self) -> str:
        """All output text so far (truncated at a matched stop string)."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def get_next_delta(self, streaming: bool, finished: bool = False) -> str:
        """Text not returned yet; streaming and unfinished, a possible stop-string start is held."""
        if finished:
            self.finish()
        self._sent = min(self._sent, self._len)
        end = self._len
        if streaming and not self.finished and self._hold:
            end -= self._held_back_len()
        if end <= self._sent:
            return ""
        delta = self._suffix(self._len - self._sent)[: end - self._sent]
        self._sent = end
        return delta

    # ---- decoding --------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if self._spaced_ids and any(i in self._spaced_ids for i in ids):
            return self._decode_spaced(ids)
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special)
        return self.tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _decode_spaced(self, ids: list[int]) -> str:
        # Runs of ordinary tokens decode together; each kept added token is its own piece.
        pieces, run = [], []
        for i in ids:
            if i in self._spaced_ids:
                if run:
                    pieces.append(self._decode_plain(run))
                    run = []
                pieces.append(self._decode_plain([i]))
            else:
                run.append(i)
        if run:
            pieces.append(self._decode_plain(run))
        return " ".join(p for p in pieces if p)

    def _decode_plain(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special)
        return self.tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _decode_step(self, force: bool) -> str:
        """Text added by ids[read:], or "" while it ends mid-character (unless forced)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        pending = len(self._ids) - self._read
        incomplete = len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR)
        if incomplete and not force and pending < _MAX_PENDING_TOKENS:
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix >= _TRIM_IDS_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return full_text[len(prefix_text) :]

    # ---- text storage and stop strings -----------------------------------------------------

    def _append(self, text: str) -> None:
        if text:
            self._chunks.append(text)
            self._len += len(text)

    def _suffix(self, n: int) -> str:
        """The last n chars of the output text, touching only the chunks that hold them."""
        if n <= 0:
            return ""
        parts, got, j = [], 0, len(self._chunks)
        while got < n and j > 0:
            j -= 1
            parts.append(self._chunks[j])
            got += len(self._chunks[j])
        text = "".join(reversed(parts))
        return text[len(text) - n :] if len(text) > n else text

    def _truncate(self, length: int) -> None:
        drop = self._len - length
        while drop > 0:
            last = self._chunks[-1]
            if len(last) <= drop:
                self._chunks.pop()
                drop -= len(last)
            else:
                self._chunks[-1] = last[: len(last) - drop]
                drop = 0
        self._len = length

    def _check_stop(self, new_chars: int) -> str | None:
        """Find the earliest stop string ending inside the newest `new_chars` chars."""
        if not self._stops or new_chars <= 0 or self.num_output_tokens <= self.params.min_tokens:
            return None
        # window: (max stop length - 1) older chars + the new text
        window = self._suffix(min(self._len, new_chars + self._max_stop - 1))
        old = len(window) - new_chars
        best: tuple[int, str] | None = None
        for s in self._stops:
            # A match must end in the new text; earlier ones were either seen or not yet allowed.
            i = window.find(s, max(0, old - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        keep = len(s) if self.params.include_stop_str_in_output else 0
        self._truncate(self._len - len(window) + i + keep)
        self.stop_reason = s
        self.finished = True
        return s

    def _held_back_len(self) -> int:
        """Length of the longest output suffix that is a proper prefix of some stop string."""
        tail = self._suffix(min(self._hold, self._len))
        for k in range(len(tail), 0, -1):
            piece = tail[-k:]
            if any(s.startswith(piece) for s in self._stops):
                return k
        return 0

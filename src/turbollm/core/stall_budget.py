"""How many prompt tokens a step may compute while other requests decode, from step times.

A step that computes prompt tokens delays the next token of every request decoding in it. To
keep that delay bounded (issue 32: inter-token latency under load within 2x its unloaded
value), such a step may take at most `max_stall` times a decode-only step of the same batch:
P = (max_stall - 1) * t_decode(D) / t_token, where t_decode(D) is the time of a decode-only
step of D tokens and t_token the time one more prompt token adds to a step, both measured on
the engine's own steps (moving averages), so the rule holds on any CPU or GPU and model.

The budget grows with the decoding batch (a step of many decode rows is long, and the same
ratio lets more prompt tokens in), so waiting prompts are never starved under heavy load.
"""
from __future__ import annotations

# Weight of the newest step in the moving averages (steps of one size vary ~10-30% on the
# shared 2-core VMs; 0.2 forgets a changed regime within ~10 steps)
SMOOTHING = 0.2
# Fewest prompt tokens a step takes while others decode, so that a prompt always advances
MIN_TOKENS = 8


class StallBudget:
    """Moving averages of decode-only step times (per decode-token count) and of the time a
    prompt token adds, and the prompt budget they give."""

    def __init__(self, max_stall: float):
        self.max_stall = max_stall
        self.decode_s: dict[int, float] = {}  # decode tokens in a step -> its average seconds
        self._extra_s = 0.0  # averaged seconds that prompt tokens added to mixed steps
        self._tokens = 0.0   # averaged prompt tokens of those steps

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else old + SMOOTHING * (new - old)

    def decode_time(self, decode_tokens: int) -> float | None:
        """Average decode-only step time at this many decode tokens, or at the nearest count
        timed (fewer preferred: a step of more rows is not faster), None before any."""
        if not self.decode_s:
            return None
        if decode_tokens in self.decode_s:
            return self.decode_s[decode_tokens]
        nearest = min(self.decode_s, key=lambda d: (abs(d - decode_tokens), d > decode_tokens))
        return self.decode_s[nearest]

    def observe(self, decode_tokens: int, prompt_tokens: int, seconds: float) -> None:
        """One step's composition and its time."""
        if prompt_tokens == 0:
            if decode_tokens:
                self.decode_s[decode_tokens] = self._avg(self.decode_s.get(decode_tokens), seconds)
            return
        base = self.decode_time(decode_tokens) if decode_tokens else None
        if base is None:
            return  # a prefill-only step: its per-token cost has no decode step to subtract
        self._extra_s = self._avg(self._extra_s if self._tokens else None, max(0.0, seconds - base))
        self._tokens = self._avg(self._tokens or None, float(prompt_tokens))

    def tokens(self, decode_tokens: int) -> int | None:
        """Prompt tokens a step with this many decode tokens may add; None until a decode-only
        step has been timed (the caller's static rule serves meanwhile)."""
        base = self.decode_time(decode_tokens)
        if base is None:
            return None
        if not self._tokens or self._extra_s <= 0.0:
            return MIN_TOKENS  # no mixed step timed yet: start small, and measure
        per_token = self._extra_s / self._tokens
        return max(MIN_TOKENS, int((self.max_stall - 1.0) * base / per_token))

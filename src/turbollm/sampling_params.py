"""SamplingParams: per-request decoding options (vLLM / OpenAI semantics), validated on creation."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from turbollm.structured_spec import StructuredOutputSpec

# Temperatures below this are treated as greedy: dividing logits by a near-zero
# temperature overflows float32, and the result would be argmax anyway.
GREEDY_TEMPERATURE_EPS = 1e-5

# torch.Generator.manual_seed accepts this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _is_int(v: Any) -> bool:
    # bool is an int subclass; True as a token count or seed is a caller bug.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_float(name: str, v: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    """v as float if it is a finite number in [lo, hi] (or (lo, hi]); else ValueError."""
    lo_txt = f"> {lo}" if lo_open else f">= {lo}"
    rng = lo_txt if math.isinf(hi) else f"in {'(' if lo_open else '['}{lo}, {hi}]"
    msg = f"{name} must be a finite number {rng}, got {v!r}"
    if not _is_number(v) or not math.isfinite(v):
        raise ValueError(msg)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise ValueError(msg)
    return float(v)


def _check_opt_int(name: str, v: Any, lo: int) -> int | None:
    if v is None:
        return None
    if not _is_int(v) or v < lo:
        raise ValueError(f"{name} must be None or an integer >= {lo}, got {v!r}")
    return v


def _check_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool, got {v!r}")
    return v


@dataclass
class SamplingParams:
    """Decoding options for one request; invalid values raise ValueError naming the field."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 (< 1e-5) => greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = disabled
    top_k: int = 0  # 0 or -1 = disabled (normalized to 0)
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob
    repetition_penalty: float = 1.0  # HF: over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI: over output tokens
    frequency_penalty: float = 0.0  # OpenAI: over output tokens
    seed: int | None = None  # per-request generator => reproducible whatever the batch
    stop: list[str] | str | None = None  # normalized to list[str]
    stop_token_ids: list[int] | None = None  # normalized to list[int]
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0  # EOS / stop tokens are masked until this many are out
    logprobs: int | None = None  # top logprobs returned besides the sampled token
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> additive bias in [-100, 100]
    detokenize: bool = True
    # Constrained decoding: the output must match this (a JSON schema, regex, choice, grammar).
    structured_output: StructuredOutputSpec | None = None
    # Derived, not an argument: longest stop string length (0 if none).
    max_stop_len: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        self.temperature = _check_float("temperature", self.temperature, 0.0, math.inf)
        self.top_p = _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if not _is_int(self.top_k) or not (self.top_k in (0, -1) or self.top_k >= 1):
            raise ValueError(
                f"top_k must be 0 or -1 (disabled) or an integer >= 1, got {self.top_k!r}"
            )
        self.top_k = max(self.top_k, 0)
        self.min_p = _check_float("min_p", self.min_p, 0.0, 1.0)
        self.repetition_penalty = _check_float(
            "repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True
        )
        self.presence_penalty = _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _check_float(
            "frequency_penalty", self.frequency_penalty, -2.0, 2.0
        )
        seed = self.seed
        if seed is not None and (not _is_int(seed) or not _SEED_MIN <= seed <= _SEED_MAX):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64 - 1], got {seed!r}")
        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        self.ignore_eos = _check_bool("ignore_eos", self.ignore_eos)
        self.max_tokens = _check_opt_int("max_tokens", self.max_tokens, 1)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"max_tokens={self.max_tokens}"
            )
        self.logprobs = _check_opt_int("logprobs", self.logprobs, 0)
        self.prompt_logprobs = _check_opt_int("prompt_logprobs", self.prompt_logprobs, 0)
        self.include_stop_str_in_output = _check_bool(
            "include_stop_str_in_output", self.include_stop_str_in_output
        )
        self.skip_special_tokens = _check_bool("skip_special_tokens", self.skip_special_tokens)
        self.spaces_between_special_tokens = _check_bool(
            "spaces_between_special_tokens", self.spaces_between_special_tokens
        )
        self.logit_bias = self._normalize_logit_bias(self.logit_bias)
        self.detokenize = _check_bool("detokenize", self.detokenize)
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True (stop is set but detokenize=False)")
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self._check_structured_output()

    def _check_structured_output(self) -> None:
        so = self.structured_output
        if so is None:
            return
        if not isinstance(so, StructuredOutputSpec):
            raise ValueError("structured_output must be a StructuredOutputSpec, got "
                             f"{type(so).__name__}")
        # min_tokens masks the stop tokens a finished grammar allows alone: no token would be left.
        if self.min_tokens:
            raise ValueError("min_tokens cannot be combined with structured_output")

    @staticmethod
    def _normalize_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string, a list of strings or None, got {stop!r}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only strings, got {s!r}")
            if not s:
                raise ValueError("stop must not contain empty strings")
        return list(stop)

    @staticmethod
    def _normalize_stop_token_ids(ids: Any) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {ids!r}")
        return list(ids)

    @staticmethod
    def _normalize_logit_bias(bias: Any) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {bias!r}")
        out: dict[int, float] = {}
        for k, v in bias.items():
            # OpenAI JSON sends keys as strings ("50256": -100).
            tok = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k
            if not _is_int(tok) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {k!r}")
            out[tok] = _check_float(f"logit_bias[{tok}]", v, -100.0, 100.0)
        return out

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (temperature 0)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def seeded_sampling(self) -> bool:
        """Random sampling from a seed: its text must depend on the seed alone (batch-invariant
        steps, speculation kept on in any batch)."""
        return self.seed is not None and not self.greedy

    def clone(self) -> SamplingParams:
        """Deep copy (stop lists and logit_bias are not shared)."""
        return copy.deepcopy(self)

    def replace(self, **changes: Any) -> SamplingParams:
        """Copy with some fields changed, validated again."""
        new = dataclasses.replace(self.clone(), **changes)
        return new

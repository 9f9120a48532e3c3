"""What the engine hands back to callers, one RequestOutput per request per step it changed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from turbollm.core.lora_request import LoRARequest


@dataclass
class TokenLogprob:
    """The logprob of one token and its rank in the model's distribution (1 = most likely)."""

    token_id: int
    logprob: float
    rank: int
    decoded: str | None = None


@dataclass
class PositionLogprobs:
    """Logprobs at one output position: the chosen token and the top-k alternatives."""

    sampled: TokenLogprob
    top: list[TokenLogprob]


@dataclass
class CompletionOutput:
    """One of the n sequences generated for a request."""

    index: int
    text: str  # all text so far (stop string removed unless asked to keep it)
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    delta_text: str = ""  # text new since the previous output (held back near stop strings)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    # Speculative decoding, over the request's sequences: verification steps, tokens proposed
    # and tokens accepted.
    spec_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float | None:
        return (self.spec_accepted_tokens / self.spec_draft_tokens
                if self.spec_draft_tokens else None)

    @property
    def spec_mean_accepted_length(self) -> float | None:
        """Tokens emitted per verification step (accepted proposals + the target's own)."""
        return 1 + self.spec_accepted_tokens / self.spec_steps if self.spec_steps else None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # set when the engine failed while running the request
    extra: dict = field(default_factory=dict)
    # params.prompt_logprobs: None for the first prompt token (nothing predicts it), then the
    # logprob, rank and top-k of each prompt token given the tokens before it.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    lora_request: "LoRARequest | None" = None  # the adapter it ran with (None: the base)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

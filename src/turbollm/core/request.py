"""Request: one sequence's token state as the scheduler sees it (no torch here)."""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from turbollm.core.lora_request import LoRARequest
    from turbollm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Finished states come last so `status > PREEMPTED` means finished.
    FINISHED_STOPPED = 3  # EOS, stop token id or stop string
    FINISHED_LENGTH = 4  # max_tokens or context length
    FINISHED_ABORTED = 5  # client went away or abort_request()
    FINISHED_ERROR = 6  # the engine failed while running it

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A single sequence: prompt + generated tokens, and how many of them have KV computed.

    The scheduler's one rule: each step, a request is given up to
    `num_tokens - num_computed_tokens` tokens of work. A prefill chunk, a decode step and a
    recompute after preemption are all that same thing.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: "SamplingParams",
                 eos_token_ids: list[int], max_tokens: int, arrival_time: float | None = None,
                 prefix_leader: "Request | None" = None, extra: Any = None,
                 lora_request: "LoRARequest | None" = None, cache_salt: bytes = b"") -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        # all_token_ids = prompt + output; kept as one list so slicing for block hashes is cheap.
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = [] if params.ignore_eos else list(eos_token_ids)
        self.stop_token_ids = set(params.stop_token_ids or ())
        self.max_tokens = max_tokens
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit on first schedule; -1 = not yet looked up
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        # n > 1: siblings wait until the leader's prompt blocks are cached, then share them.
        self.prefix_leader = prefix_leader
        self.extra = extra  # opaque per-request data owned by the engine (detokenizer, ...)
        self.lora_request = lora_request  # the adapter it runs with; None: the base model
        # Mixed into its prefix-cache block hashes: only requests with the same salt share KV
        # blocks (blocks computed in another way, e.g. batch-invariant steps, stay apart).
        self.cache_salt = cache_salt
        # Speculative decoding: tokens proposed for the next step (verified by the target in
        # one forward pass), the draft's probabilities of them when it sampled ([k, vocab]),
        # and how many leading tokens have the draft model's KV (reset by preemption).
        self.spec_token_ids: list[int] = []
        self.spec_draft_probs = None
        self.draft_num_computed = 0
        self.num_draft_tokens = 0  # proposed and verified, over the request's life
        self.num_accepted_tokens = 0
        self.num_spec_steps = 0  # verification steps with at least one proposed token
        # Prompt logprobs (params.prompt_logprobs): how many prompt tokens after the first have
        # been scored. Until all are, the prompt is computed in full (no prefix-cache hits).
        self.num_prompt_logprobs = 0
        # Constrained decoding (params.structured_output): the engine's GrammarState, which
        # takes every output token as it is appended; None for unconstrained requests.
        self.grammar: Any = None
        self.grammar_refused = False  # a token the grammar did not allow (never expected)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prefilling(self) -> bool:
        """True until the prompt's KV is complete (a partial chunk samples nothing)."""
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        return (self.params.prompt_logprobs is not None
                and self.num_prompt_logprobs < self.num_prompt_tokens - 1)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.grammar is not None and not self.grammar.accept(token_id):
            self.grammar_refused = True

    def clear_spec(self) -> None:
        self.spec_token_ids = []
        self.spec_draft_probs = None

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    def check_stop(self) -> bool:
        """Set a finished status if the last token ends the request; True when it does."""
        if self.grammar is not None:
            if self.grammar_refused:
                self.status, self.stop_reason = RequestStatus.FINISHED_ERROR, "grammar"
                return True
            if self.grammar.is_terminated():  # the output is complete (a stop token taken)
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, None
                return True
        if self.num_output_tokens < self.params.min_tokens:
            return False
        last = self.output_token_ids[-1]
        if last in self.eos_token_ids:
            self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, None
        elif last in self.stop_token_ids:
            self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
        elif self.num_output_tokens >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
        else:
            return False
        return True

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")

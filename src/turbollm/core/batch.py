"""The engine-to-worker hand-off: what one step runs, and what it gave back. Plain data only.

Every field is an int, a list of ints, a string, a SamplingParams or LoRARequest (dataclasses
of plain values), or a grammar bitmask (a numpy int32 array), so a batch can be pickled to a
worker in another process as it is. In one process
the lists are the requests' own (no copy is made).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from turbollm.core.lora_request import LoRARequest
    from turbollm.core.request import Request
    from turbollm.core.scheduler import SchedulerOutput
    from turbollm.sampling_params import SamplingParams


@dataclass
class SequenceWork:
    """One request's part of a step."""

    request_id: str
    # tokens to run: this step's chunk, then the proposals being verified (num_proposals)
    token_ids: list[int]
    start: int  # position of token_ids[0]; every earlier position has its KV in the cache
    block_ids: list[int]  # the request's KV blocks, in order
    num_proposals: int  # trailing token_ids that are proposals to verify
    # the chunk reaches the end of the sequence: its last num_proposals + 1 rows are sampled
    sample: bool
    params: "SamplingParams"
    prompt_token_ids: list[int]  # for penalties and prompt logprobs
    output_token_ids: list[int]  # for penalties and min_tokens
    # prompt positions whose logprobs are already scored (before a preemption); -1: not asked
    num_prompt_logprobs: int = -1
    # constrained decoding: the tokens the grammar allows next, a numpy int32
    # [ceil(vocab / 32)] bitmask (bit j of word w = token 32 w + j); None when unconstrained
    grammar_bitmask: Any = None
    # the adapter these rows run with (name, id, path: plain data); None: the base model
    lora: "LoRARequest | None" = None

    @property
    def proposals(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_proposals:]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class StepBatch:
    """One step for the worker."""

    sequences: list[SequenceWork]
    # requests that finished since the last step: the worker drops their state (seeded
    # generators) before it runs this batch, so a reused request id starts afresh
    finished_request_ids: list[str] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    """Per scheduled request (same order as StepBatch.sequences)."""

    # The tokens each request gained: [] for a partial prefill chunk, one token for a plain
    # step, accepted proposals + one token for a speculative step.
    sampled_token_ids: list[list[int]]
    # Logprobs of those tokens (and top-k), one entry per token, where the request asked.
    logprobs: list[list[Any] | None]
    # Prompt logprobs scored this step (params.prompt_logprobs): for prompt tokens
    # num_prompt_logprobs + 1, + 2, ... of the request, in order; None where not asked.
    prompt_logprobs: list[list[Any] | None] | None = None


@dataclass
class DraftWork:
    """A request a draft model proposes for (speculative decoding)."""

    request_id: str
    token_ids: list[int]  # the whole sequence so far (prompt + output)
    block_ids: list[int]
    k: int  # tokens to propose
    num_computed: int  # tokens whose KV the draft's own cache holds


def sequence_work(req: "Request", n: int, block_ids: list[int]) -> SequenceWork:
    """The worker's view of `req` scheduled for `n` tokens (the proposals that fit included)."""
    start = req.num_computed_tokens
    tokens = req.all_token_ids[start:start + n]
    proposals = []
    if start + n > req.num_tokens:  # the scheduler keeps exactly the proposals that fit
        proposals = req.spec_token_ids[:start + n - req.num_tokens]
        tokens = tokens + proposals
    return SequenceWork(
        request_id=req.request_id, token_ids=tokens, start=start, block_ids=block_ids,
        num_proposals=len(proposals), sample=start + n >= req.num_tokens, params=req.params,
        prompt_token_ids=req.prompt_token_ids, output_token_ids=req.output_token_ids,
        num_prompt_logprobs=req.num_prompt_logprobs if req.needs_prompt_logprobs else -1,
        lora=req.lora_request)


def step_batch(so: "SchedulerOutput", finished_request_ids: list[str]) -> StepBatch:
    """The worker's batch for a scheduled step."""
    return StepBatch([sequence_work(r, n, b) for r, n, b in
                      zip(so.requests, so.num_scheduled_tokens, so.block_tables)],
                     finished_request_ids)

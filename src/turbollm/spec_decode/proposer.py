"""Proposers: where the tokens to verify come from, and the engine-side glue of one step."""
from __future__ import annotations

import numpy as np

from turbollm.config import SpeculativeConfig
from turbollm.core.batch import DraftWork
from turbollm.core.request import Request
from turbollm.spec_decode.controller import SpecController
from turbollm.spec_decode.ngram import propose_ngram
from turbollm.spec_decode.step_cost import linear_costs

# Price of one more verified proposal, in plain decode steps, where none was measured: the
# session-6 measurement on this CPU (a GPU, memory-bound to far more rows, would want ~0).
FALLBACK_VERIFY_COST = 0.25
# Running decodes from which speculation is switched off (unless seeded sampling).
DISABLE_BATCH_SIZE = 8


class NgramProposer:
    """Prompt lookup over each request's prompt and output so far."""

    cost_per_token = 0.0  # no model runs: proposing is a few numpy comparisons

    def __init__(self, config: SpeculativeConfig):
        self.n_min, self.n_max = config.ngram_min, config.ngram_max

    def propose(self, reqs: list[Request], ks: list[int]) -> list[list[int]]:
        return [propose_ngram(np.asarray(r.all_token_ids), k, self.n_min, self.n_max) if k
                else [] for r, k in zip(reqs, ks)]


class WorkerDraftProposer:
    """A draft model's proposals, made by the worker that holds it: each request goes over as
    DraftWork (its tokens, its blocks, how many of them the draft has seen)."""

    def __init__(self, executor, block_ids_of, cost_per_token: float):
        self.executor = executor
        self.block_ids_of = block_ids_of  # request id -> its KV block ids
        self.cost_per_token = cost_per_token  # one draft forward, in target decode steps

    def propose(self, reqs: list[Request], ks: list[int]) -> list[list[int]]:
        if not any(ks):
            return [[] for _ in reqs]
        work = [DraftWork(r.request_id, r.all_token_ids, self.block_ids_of(r.request_id), k,
                          r.draft_num_computed) for r, k in zip(reqs, ks)]
        out = self.executor.propose(work)
        for r, props in zip(reqs, out):
            if props:  # the draft saw every token but the last proposal
                r.draft_num_computed = r.num_tokens + len(props) - 1
        return out


class SpeculativeDecoder:
    """After each step: choose k per decoding request and fill its `spec_token_ids`."""

    def __init__(self, config: SpeculativeConfig, proposer, max_model_len: int):
        self.config = config
        self.proposer = proposer
        self.max_model_len = max_model_len
        k = config.num_speculative_tokens
        # a step's verification cost: a fixed price per proposal until the engine has measured
        # its own steps (set_step_costs), or the price given (--verify-cost)
        per_token = (FALLBACK_VERIFY_COST if config.verify_cost == "measure"
                     else float(config.verify_cost))
        self.controller = SpecController(
            max_k=k, step_costs=linear_costs(k, per_token),
            proposal_cost=proposer.cost_per_token, disable_batch_size=DISABLE_BATCH_SIZE)
        # KV slots a decoding request keeps free beyond its step, for a draft model's proposals.
        self.num_lookahead_tokens = (config.num_speculative_tokens
                                     if config.speculative_method == "draft" else 0)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_spec_steps = 0

    def observe(self, so, sampled: list[list[int]], num_proposed: list[int]) -> None:
        """Learn from a verified step: request i proposed num_proposed[i], kept len - 1."""
        for req, tokens, k in zip(so.requests, sampled, num_proposed):
            if k and tokens:
                accepted = len(tokens) - 1
                self.controller.observe(req.request_id, k, accepted)
                self.num_draft_tokens += k
                self.num_accepted_tokens += accepted
                self.num_spec_steps += 1

    def propose(self, running: list[Request]) -> None:
        decoding = [r for r in running if not r.is_prefilling and not r.is_finished]
        ks = []
        for r in decoding:
            if r.grammar is not None:
                # A grammar's mask covers one position per step (the engine fills it from the
                # accepted tokens), so drafted tokens would go unchecked: constrained requests
                # decode plainly, in the same batch as the speculating ones.
                ks.append(0)
                continue
            k = self.controller.num_to_propose(r.request_id, len(decoding),
                                               r.params.seeded_sampling)
            # Never past max_tokens (a step emits k + 1) or the context (the proposals' KV).
            k = min(k, r.max_tokens - r.num_output_tokens - 1,
                    self.max_model_len - r.num_tokens - 1)
            ks.append(max(0, k))
        for r, props in zip(decoding, self.proposer.propose(decoding, ks)):
            r.spec_token_ids = list(props)

    @property
    def measures_step_costs(self) -> bool:
        return self.config.verify_cost == "measure"

    def set_step_costs(self, costs: list[float]) -> None:
        """costs[k], k = 0..num_speculative_tokens: a step verifying k proposals / a plain one."""
        self.controller.step_costs = list(costs)

    def forget(self, request_ids) -> None:
        self.controller.forget(request_ids)


def make_speculative_decoder(config: SpeculativeConfig, max_model_len: int, executor=None,
                             block_ids_of=None, draft_cost: float | None = None
                             ) -> SpeculativeDecoder | None:
    """The engine's speculative decoder (None when off). A draft model runs in the worker
    (`executor.propose`); `draft_cost` is its forward's cost in target steps."""
    if not config.enabled:
        return None
    if config.speculative_method == "ngram":
        return SpeculativeDecoder(config, NgramProposer(config), max_model_len)
    proposer = WorkerDraftProposer(executor, block_ids_of, draft_cost)
    return SpeculativeDecoder(config, proposer, max_model_len)

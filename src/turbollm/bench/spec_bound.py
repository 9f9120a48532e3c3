"""How fast n-gram speculation could be on given answers, at given step costs.

The speed-up speculation reaches is capped by two things: which proposals would be accepted
(the text) and what verifying them costs (the machine). Given the greedy answers of plain
decoding, every output position's proposal and how many of its tokens match the answer are
known in advance, so:
- `oracle_cost`: the best any controller could do, choosing each step's k knowing how many
  proposals will be accepted (a shortest path over output positions);
- `controller_cost`: what the engine's controller (spec_decode/controller.py) does on the
  same answers, replaying its choices (one request alone, no max_tokens cap on k);
- both with the machine's measured step costs, and the oracle again with free verification
  (every step costing one plain step: a memory-bound device's limit), or at a fraction of the
  measured extra cost (`scaled_costs`: how much cheaper verification would have to be).
Ratios are in plain decode steps, so they ignore the proposer's own time (n-gram: none).
"""
from __future__ import annotations

from turbollm.spec_decode.controller import SpecController
from turbollm.spec_decode.ngram import propose_ngram
from turbollm.spec_decode.proposer import DISABLE_BATCH_SIZE

# (proposal length, accepted prefix length) at one output position
Position = tuple[int, int]


def ngram_trace(prompt: list[int], answer: list[int], max_k: int, n_min: int = 1,
                n_max: int = 4) -> list[Position]:
    """Per position t of the answer: the n-gram proposal made with the prompt and answer[:t]
    as context (up to max_k tokens), and how many of its first tokens equal answer[t:]."""
    out = []
    context = list(prompt)
    for t in range(len(answer)):
        proposal = propose_ngram(context, max_k, n_min, n_max)
        accepted = 0
        while (accepted < len(proposal) and t + accepted < len(answer)
               and proposal[accepted] == answer[t + accepted]):
            accepted += 1
        out.append((len(proposal), accepted))
        context.append(answer[t])
    return out


def _step(position: Position, k: int) -> tuple[int, int]:
    """(proposals verified, tokens emitted) when a step at this position asks for k."""
    length, accepted = position
    verified = min(k, length)
    return verified, min(verified, accepted) + 1


def oracle_cost(trace: list[Position], step_costs: list[float]) -> float:
    """Least total cost, in plain steps, of emitting the whole answer: best[t] is the cost
    from position t on, over every k a step at t may ask for."""
    n = len(trace)
    best = [0.0] * (n + 1)
    for t in range(n - 1, -1, -1):
        options = []
        for k in range(len(step_costs)):
            verified, emitted = _step(trace[t], k)
            options.append(step_costs[verified] + best[min(n, t + emitted)])
        best[t] = min(options)
    return best[0]


def controller_cost(trace: list[Position], step_costs: list[float]) -> float:
    """Total cost when the engine's controller chooses k at every step (one request, alone)."""
    controller = SpecController(max_k=len(step_costs) - 1, step_costs=list(step_costs),
                                proposal_cost=0.0, disable_batch_size=DISABLE_BATCH_SIZE)
    t, cost = 0, 0.0
    while t < len(trace):
        k = controller.num_to_propose("r", batch_size=1, seeded_random=False)
        verified, emitted = _step(trace[t], k)
        controller.observe("r", verified, emitted - 1)
        cost += step_costs[verified]
        t += emitted
    return cost


def scaled_costs(step_costs: list[float], scale: float) -> list[float]:
    """The step costs with every verified proposal's extra cost times scale (0: free)."""
    return [1.0 + scale * (c - 1.0) for c in step_costs]


def _traces(prompts, answers, step_costs, n_min, n_max) -> list[list[Position]]:
    return [ngram_trace(p, a, len(step_costs) - 1, n_min, n_max) for p, a in zip(prompts, answers)]


def _bounds(traces: list[list[Position]], step_costs: list[float]) -> dict:
    """speedup_bounds' figures for traced answers."""
    oracle_costs = [oracle_cost(t, step_costs) for t in traces]
    free = [1.0] * len(step_costs)
    tokens = sum(len(t) for t in traces)
    return {
        "oracle": tokens / sum(oracle_costs),
        "controller": tokens / sum(controller_cost(t, step_costs) for t in traces),
        "oracle_free_verification": tokens / sum(oracle_cost(t, free) for t in traces),
        "per_answer_oracle": [len(t) / c for t, c in zip(traces, oracle_costs)],
    }


def speedup_bounds(prompts: list[list[int]], answers: list[list[int]],
                   step_costs: list[float], n_min: int = 1, n_max: int = 4) -> dict:
    """Decode speed-ups over plain decoding for the whole set of answers (tokens / cost):
    the oracle and the controller at step_costs, and the oracle with free verification."""
    return _bounds(_traces(prompts, answers, step_costs, n_min, n_max), step_costs)


def bounds_report(prompts: list[list[int]], outputs: list[list[int]], step_costs: list[float],
                  n_min: int = 1, n_max: int = 4, scales=(0.5, 0.25, 0.1)) -> dict:
    """speedup_bounds for whole outputs of plain decoding, whose first tokens came from the
    prefill (so they are context, not speculated), plus the oracle and the controller at each
    fraction of the measured extra cost per verified proposal ("cheaper_verification"). The
    proposals do not depend on the prices, so the answers are traced once."""
    contexts = [list(p) + list(o[:1]) for p, o in zip(prompts, outputs)]
    answers = [list(o[1:]) for o in outputs]
    traces = _traces(contexts, answers, step_costs, n_min, n_max)
    report = _bounds(traces, step_costs)
    report["cheaper_verification"] = []
    tokens = sum(len(t) for t in traces)
    for scale in scales:
        costs = scaled_costs(step_costs, scale)
        report["cheaper_verification"].append({
            "scale": scale, "max_k_step": costs[-1],
            "oracle": tokens / sum(oracle_cost(t, costs) for t in traces),
            "controller": tokens / sum(controller_cost(t, costs) for t in traces)})
    return report

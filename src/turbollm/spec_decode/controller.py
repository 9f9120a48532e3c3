"""How many tokens to propose for each request, each step.

Acceptance is bursty: a first proposal is a guess (n-gram lookup found a match, or the draft
agrees on the next token), but once one is accepted the answer is usually copying a stretch of
the prompt or following the draft, and the next ones are accepted far more often (n-gram on
grounded prompts, session 11: 0.63 for the first proposal, 0.91-1.0 for each one after). So
per request two rates are estimated from decayed counts: p_first for a step's first proposal
and p_next for a proposal after an accepted one. A step verifying k proposals then emits
1 + p_first (1 - p_next^k) / (1 - p_next) tokens on average, and costs step_costs[k] (a step
verifying k proposals over a plain one, measured at start-up: see step_cost.py) plus k times
the proposer's own cost (a draft model's forward); the controller picks the k with the most
tokens per unit of cost. When speculation does not pay (k = 0), a request still probes with one
proposal every `probe_every` steps so a change of regime (the answer starts quoting the prompt)
is noticed; each rejected probe doubles that interval (up to `max_probe_every`), so a draft that
never agrees costs ~1% rather than a draft forward and a verified row every few steps (a
self-draft of 6/30 layers accepts ~5%).

Large batches switch speculation off: the decode step is then bound by compute more than by
weight reads, and extra rows cost nearly their full price. Seeded sampling requests keep
speculating regardless of the batch, so their random stream, and output, does not depend on
what else the server is doing.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def expected_tokens(k: int, p_first: float, p_next: float) -> float:
    """Tokens a step verifying k proposals emits on average (the target's own token included)."""
    return 1.0 + p_first * sum(p_next ** j for j in range(k))


@dataclass
class SpecController:
    max_k: int
    step_costs: list[float]  # [k], k = 0..max_k: a step verifying k proposals / a plain step
    proposal_cost: float  # the proposer's own cost per proposed token, in plain steps
    disable_batch_size: int  # this many running decodes or more: no speculation
    prior_first: float = 0.6  # rates assumed before a request has any history ...
    prior_next: float = 0.95  # optimistic: with 0.8 a request proposing one token at a time
    # never learned how often longer runs are accepted (n-gram 0.90-0.94x, session 11)
    prior_weight: float = 2.0  # ... worth this many observed proposals each
    decay: float = 0.8  # weight of older observations, per step
    probe_every: int = 8
    max_probe_every: int = 64
    # request id -> decayed (first accepted, first tried, next accepted, next tried)
    _counts: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    _idle: dict[str, int] = field(default_factory=dict)  # steps since the last proposal
    _interval: dict[str, int] = field(default_factory=dict)  # current probe interval
    _probing: set[str] = field(default_factory=set)  # the last proposal was a probe

    def __post_init__(self) -> None:
        if len(self.step_costs) != self.max_k + 1:
            raise ValueError(f"step_costs needs {self.max_k + 1} entries (k = 0..{self.max_k}), "
                             f"got {len(self.step_costs)}")

    def rates(self, request_id: str) -> tuple[float, float]:
        """(p_first, p_next) estimates: accepted / tried, decayed, with the priors mixed in."""
        fa, ft, na, nt = self._counts.get(request_id, (0.0, 0.0, 0.0, 0.0))
        w = self.prior_weight
        return ((fa + self.prior_first * w) / (ft + w), (na + self.prior_next * w) / (nt + w))

    def best_k(self, p_first: float, p_next: float) -> int:
        best_k, best_value = 0, 1.0
        for k in range(1, self.max_k + 1):
            cost = self.step_costs[k] + k * self.proposal_cost
            value = expected_tokens(k, p_first, p_next) / cost
            if value > best_value + 1e-9:
                best_k, best_value = k, value
        return best_k

    def num_to_propose(self, request_id: str, batch_size: int, seeded_random: bool) -> int:
        self._probing.discard(request_id)  # a probe that found nothing to propose
        if batch_size >= self.disable_batch_size and not seeded_random:
            return 0
        k = self.best_k(*self.rates(request_id))
        if k:
            self._idle[request_id] = 0
            self._interval.pop(request_id, None)
            return k
        idle = self._idle.get(request_id, 0) + 1
        if idle < self._interval.get(request_id, self.probe_every):
            self._idle[request_id] = idle
            return 0
        self._idle[request_id] = 0
        self._probing.add(request_id)
        return 1

    def observe(self, request_id: str, proposed: int, accepted: int) -> None:
        """A step verified `proposed` tokens and kept the first `accepted` of them: its first
        proposal was tried, and after it one more for each accepted one but the last proposed."""
        if proposed <= 0:
            return
        if request_id in self._probing:
            self._probing.discard(request_id)
            interval = self._interval.get(request_id, self.probe_every)
            self._interval[request_id] = (min(2 * interval, self.max_probe_every)
                                          if accepted == 0 else self.probe_every)
        d = self.decay
        fa, ft, na, nt = self._counts.get(request_id, (0.0, 0.0, 0.0, 0.0))
        next_tried = min(accepted, proposed - 1)
        next_accepted = max(accepted - 1, 0)
        self._counts[request_id] = (d * fa + (accepted > 0), d * ft + 1.0,
                                    d * na + next_accepted, d * nt + next_tried)

    def forget(self, request_ids) -> None:
        for rid in request_ids:
            self._counts.pop(rid, None)
            self._idle.pop(rid, None)
            self._interval.pop(rid, None)
            self._probing.discard(rid)

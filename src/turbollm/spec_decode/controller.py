"""How many tokens to propose for each request, each step.

Per request, an exponential moving average of the acceptance rate a picks the k that maximizes
expected tokens per unit of step cost: with independent acceptances, a step verifying k
proposals emits (1 - a^(k+1)) / (1 - a) tokens and costs 1 + k * cost_per_token (verification
of one more row, plus the draft model's forward per proposal). When speculation does not pay
(k = 0), a request still probes with one proposal every `probe_every` steps so a change of
regime (the answer starts quoting the prompt) is noticed; each rejected probe doubles that
interval (up to `max_probe_every`), so a draft that never agrees costs ~1% rather than a
draft forward and a verified row every few steps (a self-draft of 6/30 layers accepts ~5%).

Large batches switch speculation off: the decode step is then bound by compute more than by
weight reads, and extra rows cost nearly their full price. Seeded sampling requests keep
speculating regardless of the batch, so their random stream, and output, does not depend on
what else the server is doing.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecController:
    max_k: int
    cost_per_token: float  # one more proposal's cost, in units of a plain decode step
    disable_batch_size: int  # this many running decodes or more: no speculation
    prior: float = 0.6  # acceptance rate assumed before a request has any history
    prior_weight: float = 2.0  # ... worth this many observed proposals
    decay: float = 0.8  # weight of older observations, per step
    probe_every: int = 8
    max_probe_every: int = 64
    _counts: dict[str, tuple[float, float]] = field(default_factory=dict)  # (accepts, rejects)
    _idle: dict[str, int] = field(default_factory=dict)  # steps since the last proposal
    _interval: dict[str, int] = field(default_factory=dict)  # current probe interval
    _probing: set[str] = field(default_factory=set)  # the last proposal was a probe

    def rate(self, request_id: str) -> float:
        """Acceptance rate estimate: accepted / (accepted + rejected) proposals, decayed.

        A step stops at its first rejection, so each step shows `accepted` successes and at
        most one failure; counting them this way is the maximum-likelihood per-token rate.
        """
        acc, rej = self._counts.get(request_id, (0.0, 0.0))
        acc += self.prior * self.prior_weight
        rej += (1 - self.prior) * self.prior_weight
        return acc / (acc + rej)

    def best_k(self, rate: float) -> int:
        best_k, best_value = 0, 1.0
        for k in range(1, self.max_k + 1):
            tokens = sum(rate ** j for j in range(k + 1))
            value = tokens / (1.0 + k * self.cost_per_token)
            if value > best_value + 1e-9:
                best_k, best_value = k, value
        return best_k

    def num_to_propose(self, request_id: str, batch_size: int, seeded_random: bool) -> int:
        self._probing.discard(request_id)  # a probe that found nothing to propose
        if batch_size >= self.disable_batch_size and not seeded_random:
            return 0
        k = self.best_k(self.rate(request_id))
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
        if proposed <= 0:
            return
        if request_id in self._probing:
            self._probing.discard(request_id)
            interval = self._interval.get(request_id, self.probe_every)
            self._interval[request_id] = (min(2 * interval, self.max_probe_every)
                                          if accepted == 0 else self.probe_every)
        acc, rej = self._counts.get(request_id, (0.0, 0.0))
        self._counts[request_id] = (self.decay * acc + accepted,
                                    self.decay * rej + (1.0 if accepted < proposed else 0.0))

    def forget(self, request_ids) -> None:
        for rid in request_ids:
            self._counts.pop(rid, None)
            self._idle.pop(rid, None)
            self._interval.pop(rid, None)
            self._probing.discard(rid)

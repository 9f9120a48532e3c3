"""Accept or reject proposed tokens against the target model's distributions.

Proposals are deterministic (the n-gram continuation, or the draft model's argmax), so the
draft distribution q is a point mass on the proposed token d. The standard rule then reads:
accept d with probability min(1, p(d) / q(d)) = p(d); on rejection sample from the residual
max(p - q, 0), which is p with d removed, renormalized; when every proposal is accepted, sample
one bonus token from the next position's p. Each emitted token is distributed exactly as the
target's p (Leviathan et al. 2023); for greedy rows "p" is the argmax, so the output is plain
decoding's, token for token.
"""
from __future__ import annotations

import torch

from turbollm.layers.sampler import _exp_noise, _MIN_EXP_NOISE


def sample_one(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from `probs` [V] (need not be normalized) by the exponential race."""
    q = _exp_noise(probs.shape, probs.device, generator).clamp_(min=_MIN_EXP_NOISE)
    return int((probs / q).argmax())


def uniform(generator: torch.Generator | None, device) -> float:
    return float(torch.rand((), device=device, generator=generator))


def verify_greedy(proposals: list[int], target_tokens: list[int]) -> list[int]:
    """target_tokens[j] is the target's argmax after proposals[:j] (len(proposals) + 1 rows)."""
    out = []
    for d, t in zip(proposals, target_tokens):
        out.append(t)
        if d != t:
            return out
    out.append(target_tokens[len(proposals)])
    return out


def verify_random(proposals: list[int], probs: torch.Tensor,
                  generator: torch.Generator | None) -> list[int]:
    """probs: [len(proposals) + 1, V], the target's sampling distribution at each position."""
    out = []
    for j, d in enumerate(proposals):
        p = probs[j]
        total = float(p.sum())
        if uniform(generator, p.device) * total < float(p[d]):
            out.append(d)
            continue
        residual = p.clone()
        residual[d] = 0.0
        if float(residual.sum()) <= 0.0:  # p is a point mass on d: rejection had probability 0
            residual = p
        out.append(sample_one(residual, generator))
        return out
    out.append(sample_one(probs[len(proposals)], generator))
    return out

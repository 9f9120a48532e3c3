"""Distillation losses between teacher and student next-token distributions, per position,
averaged over the positions a mask keeps (DistillSpec's choices).

- forward KL, KL(teacher || student): the student covers every mode of the teacher (default).
- reverse KL, KL(student || teacher): the student picks the teacher's main modes.
- total variation, 1/2 sum |p - q|: 1 - TV is the chance that speculative sampling accepts a
  drafted token, so minimizing it maximizes a draft's acceptance directly.

With a temperature T both distributions are softened by T and the KLs are scaled by T^2 (so
gradient sizes do not depend on T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("forward_kl", "reverse_kl", "tv")


def distill_loss(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Mean loss over the positions where `mask` is true ([..., vocab] logits)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2
    elif kind == "reverse_kl":
        per = (log_q.exp() * (log_q - log_p)).sum(-1) * temperature ** 2
    else:
        per = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if mask is None:
        return per.mean()
    mask = mask.to(per.dtype)
    return (per * mask).sum() / mask.sum().clamp(min=1)

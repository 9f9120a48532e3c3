"""Which weights to prune: importance scores and the masks they give.

Scores, for W [out, in]:
- magnitude: |W|, compared across the whole matrix (the classic baseline, as the Wanda paper
  runs it);
- wanda (Sun et al., 2023): |W_ij| * ||X_j||_2, with ||X_j|| the norm of input channel j over
  all calibration rows, compared within each output row (the paper finds per-output comparison
  matters for LLMs, whose input channels differ in scale by orders of magnitude).
SparseGPT picks its mask inside its own update (compress/sparsegpt.py).

Semi-structured N:M keeps the N highest-scoring weights of every M consecutive input columns of
each row, whatever the score (so it is per-row for every method).
Masks are bool with True = keep.
"""
from __future__ import annotations

import torch

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def score(method: str, weight: torch.Tensor, channel_norm: torch.Tensor | None) -> torch.Tensor:
    """Importance of each weight [out, in] (higher = keep)."""
    w = weight.float().abs()
    if method == "magnitude":
        return w
    if method == "wanda":
        if channel_norm is None:
            raise ValueError("wanda needs calibration activations")
        return w * channel_norm.float()[None, :]
    raise ValueError(f"no score for method {method!r}")


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep all but the lowest `sparsity` fraction of scores, per output row or matrix-wide."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    rows, cols = scores.shape
    mask = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = int(cols * sparsity)
        if k:
            drop = scores.topk(k, dim=1, largest=False).indices
            mask.scatter_(1, drop, False)
    else:
        k = int(scores.numel() * sparsity)
        if k:
            drop = scores.reshape(-1).topk(k, largest=False).indices
            mask.view(-1)[drop] = False
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the top-n of every m consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{n}:{m} needs a column count divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, cols)


def mask_for(method: str, weight: torch.Tensor, channel_norm: torch.Tensor | None,
             sparsity: float | None, pattern: tuple[int, int] | None) -> torch.Tensor:
    """The keep-mask of magnitude / wanda pruning at `sparsity` or N:M `pattern`."""
    s = score(method, weight, channel_norm)
    if pattern is not None:
        return nm_mask(s, *pattern)
    return unstructured_mask(s, sparsity, per_row=method != "magnitude")

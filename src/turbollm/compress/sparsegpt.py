"""SparseGPT (Frantar & Alistarh, 2023): prune a linear layer and update the weights it keeps so
that the layer's output on calibration inputs changes as little as possible.

For y = W x with input second moment H = X^T X, removing weight w_ij and compensating the
not-yet-visited columns of row i optimally (optimal brain surgeon) uses row j of the upper
Cholesky factor U of H^-1, exactly as GPTQ does for rounding: err = w_ij / U[j, j];
W[i, j:] -= err * U[j, j:]. Columns are walked in blocks of `block` columns; the mask of each
block is chosen when the walk reaches it, from the OBS saliency w^2 / U[j, j]^2 of the
already-updated weights (unstructured: the lowest `sparsity` fraction of the block, over all
rows; N:M: the lowest M - N of each group of M columns per row). A block's accumulated errors
update the later columns in one matmul (the lazy batch update).
"""
from __future__ import annotations

import torch

from turbollm.quantization.gptq import inverse_hessian_factor


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                    pattern: tuple[int, int] | None = None, block: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """W [out, in] pruned (zeros where removed) and updated, in fp32, from H [in, in]."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity and pattern")
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    if pattern is not None:
        n, m = pattern
        if in_f % m or block % m:
            raise ValueError(f"{n}:{m} needs columns and block size divisible by {m}")
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0  # channels never active: they carry no error weight
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    U = inverse_hessian_factor(h, damp)
    threads = torch.get_num_threads()
    # thousands of tiny column ops: one thread avoids a wake-up per op (as in GPTQ's walk)
    torch.set_num_threads(1)
    try:
        for b0 in range(0, in_f, block):
            b1 = min(b0 + block, in_f)
            wb = w[:, b0:b1].clone()
            errs = torch.empty_like(wb)
            d = U[b0:b1, b0:b1].diagonal()
            prune = torch.zeros_like(wb, dtype=torch.bool)
            if pattern is None:
                saliency = wb.square() / d.square()[None, :]
                k = int(saliency.numel() * sparsity)
                if k:
                    prune.view(-1)[saliency.reshape(-1).topk(k, largest=False).indices] = True
            for j in range(b1 - b0):
                if pattern is not None and j % m == 0:
                    sal = wb[:, j:j + m].square() / d[j:j + m].square()[None, :]
                    drop = sal.topk(m - n, dim=1, largest=False).indices
                    prune[:, j:j + m].scatter_(1, drop, True)
                col = wb[:, j]
                q = torch.where(prune[:, j], torch.zeros_like(col), col)
                err = (col - q) / d[j]
                wb[:, j:] -= err[:, None] * U[b0 + j, b0 + j:b1][None, :]
                wb[:, j] = q  # exact zeros where pruned (the update leaves rounding residue)
                errs[:, j] = err
            w[:, b0:b1] = wb
            if b1 < in_f:
                w[:, b1:] -= errs @ U[b0:b1, b1:]
    finally:
        torch.set_num_threads(threads)
    return w


def layer_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over calibration rows of ||x (W - W')^T||^2 = trace(D H D^T), D = W - W'."""
    d = weight.float() - pruned.float()
    return float(((d @ hessian.float()) * d).sum())

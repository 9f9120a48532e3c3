"""RMSNorm, computed in fp32 and cast back, like the HF Llama reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbollm.layers import native_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden]
        if native_ops.usable(x) and x.is_contiguous() and self.weight.dtype == torch.float32:
            return native_ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one fused op; same result as the HF formula in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

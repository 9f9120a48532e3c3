"""SiLU-and-multiply of the fused gate_up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from turbollm.layers import native_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [T, 2 * intermediate] -> [T, intermediate]
    if native_ops.usable(gate_up) and gate_up.is_contiguous():
        return native_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

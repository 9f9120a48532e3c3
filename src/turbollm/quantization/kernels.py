"""Low-bit matmul kernels behind the int8/int4 linear methods.

A kernel state is a small dataclass holding the weight in the layout its kernel reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Int4State:
    packed: torch.Tensor   # uint8 [out, in // 2]: column 2j in the low nibble, 2j+1 in the high
    scales: torch.Tensor   # float32 [out, in // G]
    zeros: torch.Tensor    # float32 [out, in // G]
    group_size: int


def int4_pack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> Int4State:
    q = qweight.to(torch.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return Int4State(packed, scales.contiguous(), zeros.contiguous(), group_size)


def int4_unpack(state: Int4State):
    p = state.packed
    q = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], p.shape[1] * 2)
    return q, state.scales, state.zeros


def int4_linear(x: torch.Tensor, state: Int4State) -> torch.Tensor:
    """y = x W^T for x: [M, in] (no bias)."""
    from turbollm.quantization.int4 import dequantize_int4
    q, s, z = int4_unpack(state)
    return F.linear(x, dequantize_int4(q, s, z, state.group_size).to(x.dtype))


def state_bytes(state) -> int:
    """Bytes of the tensors a kernel state holds."""
    return sum(t.numel() * t.element_size() for t in vars(state).values()
               if isinstance(t, torch.Tensor))


@dataclass
class Int8State:
    qweight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor   # float32 [out]


def int8_pack(qweight: torch.Tensor, scales: torch.Tensor) -> Int8State:
    return Int8State(qweight.contiguous(), scales.contiguous())


def int8_unpack(state: Int8State):
    return state.qweight, state.scales


def int8_linear(x: torch.Tensor, state: Int8State) -> torch.Tensor:
    """y = x W^T for x: [M, in] (no bias)."""
    if x.dtype == torch.bfloat16 or x.shape[0] == 1:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), state.qweight,
                                              state.scales.to(torch.bfloat16))
        return y.to(x.dtype)
    return F.linear(x, state.qweight.to(x.dtype)) * state.scales.to(x.dtype)

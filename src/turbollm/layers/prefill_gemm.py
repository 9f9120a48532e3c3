"""Prefill-sized products of fp32 activations (more rows than our C kernels serve): in fp32, or
on CPUs with AMX in bf16 tiles (torch's oneDNN kernels), which run them ~1.9x faster on a
Sapphire Rapids VM (512-token prefill of the bundled model, session 15).

bf16 rounds the activations and the (widened) weights to 8 mantissa bits for these products
only; decode steps keep our fp32/int16 kernels. KernelConfig.prefill_dtype chooses; the worker
sets this process-wide switch (the last engine built sets it, like exact_activations). The same
switch lets packed int4/int8 products of 8-128 rows take our AMX tile kernels
(quantization/kernels.py), which round nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_bf16 = False


def use_bf16(on: bool) -> None:
    global _bf16
    _bf16 = on


def in_bf16() -> bool:
    return _bf16


def prefill_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 times w [N, K]^T (any float dtype): [M, N] fp32."""
    if _bf16:
        return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).float()
    return F.linear(x, w.to(x.dtype))

"""Prefill-sized products of fp32 activations (more rows than our C kernels serve): in fp32, or
on CPUs with bf16 instructions in bf16 (torch's oneDNN kernels: AMX tiles, or AVX-512 BF16 dot
products), which run a 512-token prefill of the bundled model ~1.9x faster on a Sapphire Rapids
VM (session 15) and ~1.6x on a Zen 4 EPYC (session 20).

bf16 rounds the activations and the (widened) weights to 8 mantissa bits for these products
only; decode steps keep our fp32/int16 kernels. KernelConfig.prefill_dtype chooses; the worker
sets this process-wide switch (the last engine built sets it, like exact_activations). The same
switch lets packed int4/int8 products of 8-128 rows take our AMX tile kernels
(quantization/kernels.py), which round nothing.

Within `row_invariant()` none of that applies: every product of several rows is computed row by
row the way one decode row is (the kernels that sum each output in one order whatever the row
count), so a row's bits do not depend on what else shares the step. The model runner turns it on
for steps verifying speculative proposals (greedy speculation must reproduce plain decoding) and
for batch-invariant steps (KernelConfig.batch_invariant: a seeded request's text must not depend
on the batch).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

_bf16 = False
_row_invariant = False


def use_bf16(on: bool) -> None:
    global _bf16
    _bf16 = on


def in_bf16() -> bool:
    return _bf16


@contextmanager
def row_invariant(on: bool = True):
    """Within: products of several rows give each row the bits it gets alone (see above)."""
    global _row_invariant
    old, _row_invariant = _row_invariant, on
    try:
        yield
    finally:
        _row_invariant = old


def is_row_invariant() -> bool:
    return _row_invariant


def prefill_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 times w [N, K]^T (any float dtype): [M, N] fp32."""
    if _bf16:
        return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).float()
    return F.linear(x, w.to(x.dtype))

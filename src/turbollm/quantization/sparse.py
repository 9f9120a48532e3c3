"""Bitmask-sparse weights for decode rows: the packed form the C kernel reads (csrc/sparse.c)
and the call. quantization/sparse_method.py serves pruned linears with it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from turbollm.native_build import I64 as _I
from turbollm.native_build import PTR as _P
from turbollm.native_build import load_library

_SRC = Path(__file__).parent / "csrc" / "sparse.c"
_ARGS = [_P, _I, _P, _P, _P, _P, _I, _I]
_SIGNATURES = {"bitmask_gemv_f32": _ARGS, "bitmask_gemv_bf16": _ARGS}
_PAD = 8  # values past the last kept one: the kernel loads 8 at a time


@functools.cache
def lib(isa: str | None = None):
    """The loaded kernel library (the process's ISA variant, or `isa`), or None where it cannot
    run here."""
    L = load_library(_SRC, _SIGNATURES, isa)
    if L is not None:
        for name in ("bitmask_gemv_max_rows", "bitmask_gemv_bf16_columns"):
            getattr(L, name).argtypes, getattr(L, name).restype = [], _I
    return L


def bf16_columns_per_expand(isa: str | None = None) -> int:
    """Columns one expand of bf16 values covers in the kernel (32 with AVX-512 VBMI2, 8 on
    AVX2; 0 without the library)."""
    L = lib(isa)
    return int(L.bitmask_gemv_bf16_columns()) if L is not None else 0


@dataclass
class BitmaskWeight:
    """W [out, in] as kept values (row-major, padded), a bitmask and row offsets."""

    values: torch.Tensor  # [nnz + 8] fp32 or bf16
    mask: torch.Tensor  # uint8 [out, in / 8], bit b of byte j = column 8j + b
    row_offsets: torch.Tensor  # int64 [out]
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "BitmaskWeight":
        if w.dim() != 2 or w.shape[1] % 8:
            raise ValueError(f"need a 2-D weight with a multiple of 8 columns, got {tuple(w.shape)}")
        if w.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"bitmask kernels take fp32 or bf16 values, got {w.dtype}")
        keep = w != 0
        counts = keep.sum(1)
        values = torch.cat([w[keep], torch.zeros(_PAD, dtype=w.dtype)])
        # the compressed-tensors bit order (loader/compressed_tensors.py): column 8j + b is
        # bit b of byte j
        mask = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
        return cls(values, mask, (torch.cumsum(counts, 0) - counts).to(torch.int64),
                   tuple(w.shape))

    def nbytes(self) -> int:
        """Bytes a GEMV reads for the weight (values, mask and offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.mask,
                                                           self.row_offsets))


def bitmask_linear(x: torch.Tensor, w: BitmaskWeight, isa: str | None = None) -> torch.Tensor:
    """x [M, in] fp32 @ W^T -> [M, out] fp32 with the C kernel (M rows in calls of at most the
    kernel's row limit; `isa` picks a build other than the process's, for tests). Raises where
    the kernel is unavailable."""
    L = lib(isa)
    if L is None:
        raise RuntimeError("the sparse C kernel is not available on this machine")
    out_f, in_f = w.shape
    x = x.contiguous()
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != in_f:
        raise ValueError(f"x must be fp32 [M, {in_f}], got {x.dtype} {tuple(x.shape)}")
    fn = L.bitmask_gemv_f32 if w.values.dtype == torch.float32 else L.bitmask_gemv_bf16
    y = torch.empty(x.shape[0], out_f)
    step = int(L.bitmask_gemv_max_rows())
    for r0 in range(0, x.shape[0], step):
        xs, ys = x[r0:r0 + step], y[r0:r0 + step]
        fn(xs.data_ptr(), xs.shape[0], w.values.data_ptr(), w.mask.data_ptr(),
           w.row_offsets.data_ptr(), ys.data_ptr(), out_f, in_f)
    return y

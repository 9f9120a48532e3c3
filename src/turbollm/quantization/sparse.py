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
from turbollm.native_build import RowKernel, load_library

_SRC = Path(__file__).parent / "csrc" / "sparse.c"
_ARGS = [_P, _I, _P, _P, _P, _P, _I, _I]
_ARGS_I8 = _ARGS[:5] + [_P] + _ARGS[5:]  # + per-row scales
_SIGNATURES = {"bitmask_gemv_f32": _ARGS, "bitmask_gemv_bf16": _ARGS,
               "bitmask_gemv_i8": _ARGS_I8, "bitmask_gemv_i8_fixed4": _ARGS_I8,
               "bitmask_gemv_i8_24": _ARGS_I8}
# int8 value layouts (BitmaskWeight.layout) and their kernels: any mask; exactly 4 values per 8
# columns (4:8; fixed offsets, no popcounts); exactly 2 per 4 columns (2:4; the 4:8 kernel on
# builds without AVX-512 VBMI)
_I8_KERNELS = {"any": "bitmask_gemv_i8", "4of8": "bitmask_gemv_i8_fixed4",
               "2of4": "bitmask_gemv_i8_24"}
_PAD = 64  # values past the last kept one: the kernels load up to 64 at a time


@functools.cache
def lib(isa: str | None = None):
    """The loaded kernel library (the process's ISA variant, or `isa`), or None where it cannot
    run here."""
    L = load_library(_SRC, _SIGNATURES, isa)
    if L is not None:
        for name in ("bitmask_gemv_max_rows", "bitmask_gemv_bf16_columns",
                     "bitmask_gemv_i8_columns"):
            getattr(L, name).argtypes, getattr(L, name).restype = [], _I
    return L


def bf16_columns_per_expand(isa: str | None = None) -> int:
    """Columns one expand of bf16 values covers in the kernel (32 with AVX-512 VBMI2, 8 on
    AVX2; 0 without the library)."""
    L = lib(isa)
    return int(L.bitmask_gemv_bf16_columns()) if L is not None else 0


def int8_columns_per_step(isa: str | None = None) -> int:
    """Columns one step of the int8 kernels covers: 64 with AVX-512 VBMI's byte permutes (any
    mask, and 2:4), else 8 through byte shuffles (16 for 4-of-8 layouts); 0 without the
    library."""
    L = lib(isa)
    return int(L.bitmask_gemv_i8_columns()) if L is not None else 0


@dataclass
class BitmaskWeight:
    """W [out, in] as kept values (row-major, padded), a bitmask and row offsets; int8 values
    carry one fp32 scale per row (W[o] = values of row o * scales[o])."""

    values: torch.Tensor  # [nnz + _PAD] fp32, bf16 or int8
    mask: torch.Tensor  # uint8 [out, in / 8], bit b of byte j = column 8j + b
    row_offsets: torch.Tensor  # int64 [out]
    shape: tuple[int, int]
    scales: torch.Tensor | None = None  # float32 [out], int8 values only
    layout: str = "any"  # int8 values: "2of4" / "4of8" when every 4 / 8 columns hold 2 / 4

    @classmethod
    def from_dense(cls, w: torch.Tensor, scales: torch.Tensor | None = None) -> "BitmaskWeight":
        """From a dense fp32 / bf16 weight, or an int8 one with its per-row `scales`."""
        if w.dim() != 2 or w.shape[1] % 8:
            raise ValueError(f"need a 2-D weight with a multiple of 8 columns, got {tuple(w.shape)}")
        if w.dtype not in (torch.float32, torch.bfloat16, torch.int8):
            raise ValueError(f"bitmask kernels take fp32, bf16 or int8 values, got {w.dtype}")
        if (w.dtype == torch.int8) != (scales is not None):
            raise ValueError("int8 values need per-row scales, and only they take them")
        if scales is not None:
            scales = scales.to(torch.float32).reshape(-1).contiguous()
            if scales.shape != (w.shape[0],):
                raise ValueError(f"need one scale per row ({w.shape[0]}), got "
                                 f"{tuple(scales.shape)}")
        keep = w != 0
        layout = int8_layout(keep) if w.dtype == torch.int8 else "any"
        if layout != "any":
            keep = _filled(keep, *_GROUPS[layout])
        counts = keep.sum(1)
        values = torch.cat([w[keep], torch.zeros(_PAD, dtype=w.dtype)])
        # the compressed-tensors bit order (loader/compressed_tensors.py): column 8j + b is
        # bit b of byte j
        mask = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
        return cls(values, mask, (torch.cumsum(counts, 0) - counts).to(torch.int64),
                   tuple(w.shape), scales, layout)

    def nbytes(self) -> int:
        """Bytes a GEMV reads for the weight (values, mask, offsets and any scales)."""
        parts = (self.values, self.mask, self.row_offsets, self.scales)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def row_kernel(self, L, M: int) -> RowKernel:
        """The kernel call of library `L` for M <= its row limit rows (call kind LIN_SPARSE, or
        LIN_SPARSE_Q8 for int8 values)."""
        n, k = self.shape
        v, m, o = self.values.data_ptr(), self.mask.data_ptr(), self.row_offsets.data_ptr()
        if self.scales is not None:
            fn, s = getattr(L, _I8_KERNELS[self.layout]), self.scales.data_ptr()
            return RowKernel(lambda x, y: fn(x, M, v, m, o, s, y, n, k), fn,
                             RowKernel.SPARSE_Q8, M, v, m, o, s, n, k)
        fn = L.bitmask_gemv_f32 if self.values.dtype == torch.float32 else L.bitmask_gemv_bf16
        return RowKernel(lambda x, y: fn(x, M, v, m, o, y, n, k), fn, RowKernel.SPARSE,
                         M, v, m, o, n, k)


# layout -> (columns per group, values per group)
_GROUPS = {"2of4": (4, 2), "4of8": (8, 4)}


def int8_layout(keep: torch.Tensor) -> str:
    """The fixed layout the kept columns `keep` [out, in] fit: every group holds at most its
    values, and filling each to them with stored zeros adds at most an eighth (so 2:4 / 4:8
    weights whose int8 rounding zeroed a few kept values, not sparser ones); "any" otherwise."""
    for layout, (cols, per) in _GROUPS.items():
        counts = keep.reshape(keep.shape[0], -1, cols).sum(-1)
        if bool((counts <= per).all()) and int((per - counts).sum()) * 8 <= per * counts.numel():
            return layout
    return "any"


def _filled(keep: torch.Tensor, cols: int, per: int) -> torch.Tensor:
    """`keep` with the first unkept columns of each group of `cols` marked kept until it holds
    `per`."""
    k = keep.reshape(keep.shape[0], -1, cols)
    need = per - k.sum(-1, keepdim=True)
    free = ~k
    return (k | (free & (free.cumsum(-1) <= need))).reshape(keep.shape)


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
    y = torch.empty(x.shape[0], out_f)
    step = int(L.bitmask_gemv_max_rows())
    for r0 in range(0, x.shape[0], step):
        xs, ys = x[r0:r0 + step], y[r0:r0 + step]
        w.row_kernel(L, xs.shape[0])(xs.data_ptr(), ys.data_ptr())
    return y

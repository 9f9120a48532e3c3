"""C versions (csrc/cpu_ops.c) of the decoder layer's small fp32 ops, for decode-sized inputs.

At a few rows, torch spends 10-40 us per RMSNorm / SiLU-and-mul / rotary call dispatching
several aten kernels; a single C call takes 1-3 us. Larger inputs (prefill) stay on torch, whose
kernels use every thread. `usable(x)` says which path a tensor takes.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from turbollm.layers import prefill_gemm as multi_row
from turbollm.native_build import F32, I64, PTR, RowKernel, load_library, read_abi

_SRC = Path(__file__).parent / "csrc" / "cpu_ops.c"
_SIGNATURES = {
    "rms_norm_f32": [PTR, PTR, PTR, I64, I64, F32],
    "add_rms_norm_f32": [PTR, PTR, PTR, PTR, I64, I64, F32],
    "silu_mul_f32": [PTR, PTR, I64, I64],
    "rope_f32": [PTR, PTR, PTR, I64, I64, I64, I64],
    "bf16_gemm_f32": [PTR, I64, PTR, PTR, I64, I64],
    "f32_gemm_f32": [PTR, I64, PTR, PTR, I64, I64],
    "f16_gemm_f32": [PTR, I64, PTR, PTR, I64, I64],
    "e4m3_gemm_scaled_f32": [PTR, I64, PTR, PTR, PTR, I64, I64, I64],
    "decode_layers": [PTR, I64, PTR, F32, F32],
    "argmax_rows_f32": [PTR, I64, I64, PTR],
    "lora_rows_f32": [PTR, I64, I64, PTR, PTR, PTR, I64, I64, PTR, PTR, PTR, I64, I64],
    "lora_rows_bf16": [PTR, I64, I64, PTR, PTR, PTR, I64, I64, PTR, PTR, PTR, I64, I64],
}
# Activation rows up to which dense_linear beats torch, measured on all 120 linears of the 135M
# model (not cache-resident, as in a real forward), 2 threads: time C / torch at 1, 16, 64, 128,
# 256 rows = 0.45, 0.55, 0.54, 0.85, 0.91 for bf16 weights (torch widens the whole weight to
# fp32 first) and 0.57, 0.60, 0.55, 0.77, 0.94 for fp32. Past ~128 rows the activations no
# longer fit in L2 beside the weight block, so the margin shrinks. Row-invariant products
# (prefill_gemm.row_invariant) take it at any row count: it sums each output in one order
# whatever M, where torch's GEMM blocks by M.
MAX_DENSE_ROWS = 128
# Where prefill-sized products run in bf16 (prefill_gemm.in_bf16: a CPU with bf16 instructions,
# oneDNN's AVX512-BF16 or AMX kernels), torch's bf16 GEMM beats this kernel on bf16 weights
# from ~16 rows: time C / torch at 8, 16, 32, 64, 128 rows = 1.1-1.2, 1.4-1.5, 1.8-2.0, 2.0-2.2,
# 2.2-2.5 for 2048-wide layers, 0.5-0.9, 1.0-1.1, 1.3-1.7, 1.5-2.0, 1.8-2.2 for the 135M
# model's (Zen 4, 2 threads, weights not cache-resident; session 24). So there this kernel
# serves only decode-sized inputs; layers below SMALL_LAYER values keep it to 16 rows, where
# the GEMM saves nothing and leaving the C decode loop costs its Python (a 16-row decode step of
# the 135M model was 0.85-0.99x as fast through the GEMM).
MAX_DENSE_ROWS_BF16_GEMM = 8
MAX_DENSE_ROWS_BF16_GEMM_SMALL = 16
SMALL_LAYER = 1 << 21
_GEMM_KERNELS = {torch.bfloat16: "bf16_gemm_f32", torch.float32: "f32_gemm_f32",
                 torch.float16: "f16_gemm_f32"}
# Above this many values torch's multi-threaded kernels win over one C thread.
MAX_VALUES = 1 << 15


@functools.cache
def lib():
    return load_library(_SRC, _SIGNATURES)


@functools.cache
def decode_abi():
    """decode_layers' word layout (csrc/decode_abi.h) as the compiled library defines it: a
    read-only namedtuple of ints by name (abi.S_T, abi.LAYER_WORDS, ...), or None without it."""
    L = lib()
    return None if L is None else read_abi(L, "decode_abi")


def usable(x: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= MAX_VALUES
            and x.shape[-1] % 16 == 0 and lib() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, dim] fp32 contiguous, weight [dim] fp32."""
    out = torch.empty_like(x)
    lib().rms_norm_f32(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                       eps)
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2 * inter] fp32 contiguous -> silu(gate) * up [rows, inter]."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter)
    lib().silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), rows, inter)
    return out


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate qk [T, heads, D] in place (rows may be strided; heads x D contiguous) with
    contiguous cos/sin [T, 1, D / 2]."""
    T, heads, D = qk.shape
    lib().rope_f32(qk.data_ptr(), cos.data_ptr(), sin.data_ptr(), T, heads, D, qk.stride(0))
    return qk


def argmax_rows(x: torch.Tensor) -> list[int] | None:
    """The first index of each row's largest value of fp32 x [R, V] (as torch.argmax), or None
    where the C call does not serve (not CPU fp32, no library, a NaN in some row)."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2
            or not x.is_contiguous() or lib() is None):
        return None
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib().argmax_rows_f32(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    found = out.tolist()
    return None if min(found, default=0) < 0 else found


def _rows_ok(weight: torch.Tensor, M: int) -> bool:
    """Whether this kernel is the faster (or the required, row-invariant) one for M rows."""
    if multi_row.is_row_invariant():
        return True
    if weight.dtype == torch.bfloat16 and multi_row.in_bf16():
        small = weight.numel() <= SMALL_LAYER
        return M <= (MAX_DENSE_ROWS_BF16_GEMM_SMALL if small else MAX_DENSE_ROWS_BF16_GEMM)
    return M <= MAX_DENSE_ROWS


def dense_linear_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `dense_linear` takes x (fp32, few rows) with this bf16, fp16 or fp32 weight."""
    return (weight.dtype in _GEMM_KERNELS and x.dtype == torch.float32 and x.dim() == 2
            and _rows_ok(weight, x.shape[0]) and x.device.type == "cpu"
            and x.shape[1] % 8 == 0 and weight.is_contiguous() and lib() is not None)


def dense_row_kernel(weight: torch.Tensor, M: int):
    """The C call dense_linear makes for M fp32 rows, as fn(x_ptr, y_ptr) writing fp32
    [M, out]; None where dense_linear does not serve (see dense_linear_usable)."""
    if (weight.dtype not in _GEMM_KERNELS or not _rows_ok(weight, M)
            or weight.device.type != "cpu" or weight.shape[1] % 8
            or not weight.is_contiguous() or lib() is None):
        return None
    kernel = getattr(lib(), _GEMM_KERNELS[weight.dtype])
    w, (n, k) = weight.data_ptr(), weight.shape
    return RowKernel(lambda x, y: kernel(x, M, w, y, n, k), kernel, RowKernel.DENSE, M, w, n, k)


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 times a bf16, fp16 or fp32 weight [N, K]^T, accumulated in fp32: [M, N]."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], weight.shape[0])
    dense_row_kernel(weight, x.shape[0])(x.data_ptr(), y.data_ptr())
    return y


def e4m3_row_kernel(qweight: torch.Tensor, scales: torch.Tensor, M: int):
    """The C call for M fp32 rows times a float8_e4m3fn weight [N, K] with fp32 `scales` [N]
    (w = q * scale per output row), as fn(x_ptr, y_ptr) writing fp32 [M, N]; None where it does
    not serve. The weight is read at one byte per value and widened in registers (any M: torch
    converts fp8 one value at a time, so no torch path beats it); each row's bits do not depend
    on how many rows share the call."""
    if (qweight.dtype != torch.float8_e4m3fn or qweight.device.type != "cpu"
            or qweight.shape[1] % 8 or not qweight.is_contiguous() or scales.dtype != torch.float32
            or not scales.is_contiguous() or lib() is None):
        return None
    kernel = lib().e4m3_gemm_scaled_f32
    w, s, (n, k) = qweight.data_ptr(), scales.data_ptr(), qweight.shape
    return RowKernel(lambda x, y: kernel(x, M, w, s, y, n, k, 0), kernel, RowKernel.Q8,
                     M, w, s, n, k, 0)


def e4m3_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x [M, K] times the fp8 weight [N, K]^T scaled per output row, fp32 [M, N]; None where
    the C kernel does not serve (see e4m3_row_kernel)."""
    if x.device.type != "cpu" or x.dim() != 2:
        return None
    kernel = e4m3_row_kernel(qweight, scales, x.shape[0])
    if kernel is None:
        return None
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], qweight.shape[0])
    kernel(x.data_ptr(), y.data_ptr())
    return y

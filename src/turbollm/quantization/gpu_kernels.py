"""Low-bit linears on CUDA: Triton kernels that read the packed int4 / int8 weights directly.

The CPU kernels (csrc/lowbit.c) cannot read device memory, so on a GPU the same kernel states
(kernels.Int4State / Int8State, moved to the device at install) are served here. Each program
computes a BLOCK_M x BLOCK_N tile of y = x W^T: it loads the packed bytes of BLOCK_N weight rows,
widens them to x's dtype with their group scale and min in registers, and accumulates tl.dot
products in fp32. The weight therefore crosses memory as 4 or 8 bits per value, where
dequantize-then-matmul writes and reads it again at 16 bits.

Prefill-sized inputs (WIDEN_FROM_ROWS rows and more), and every call without Triton (it ships
with CUDA builds of torch), widen the weight on the device and use torch's matmul (`widened_*`). The kernels run on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1 set before this module is imported), which is how the tests check them
against the dequantize-then-matmul reference on a machine without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the widened path below serves
    triton = None

# Tile sizes: tl.dot needs at least 16 in every dimension. BLOCK_K spans whole 32-column
# int4 blocks (their 16 bytes hold columns j and j + 16 in one byte).
BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
# From this many activation rows (prefill) the weight is widened once and cuBLAS multiplies:
# its reuse over that many rows outweighs writing and reading the widened copy (vLLM switches
# its AWQ layers at the same count). A guess until measured on a GPU.
WIDEN_FROM_ROWS = 256


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _int4_kernel(x_ptr, w_ptr, s_ptr, f_ptr, y_ptr, M, N, K, NG, stride_xm, stride_ym,
                     G: tl.constexpr, ZERO_FORM: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        j = tl.arange(0, BK // 2)                # byte of the K slice
        col_lo = (j // 16) * 32 + j % 16          # column of its low nibble (high: + 16)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + col_lo
            k_ok = cols < K
            wb = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + j)[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0)
            sf_off = rn[:, None] * NG + (cols // G)[None, :]
            sf_ok = n_ok[:, None] & k_ok[None, :]
            s = tl.load(s_ptr + sf_off, mask=sf_ok, other=0.0).to(tl.float32)
            f = tl.load(f_ptr + sf_off, mask=sf_ok, other=0.0).to(tl.float32)
            mn = -f * s if ZERO_FORM else f
            x_lo = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                           mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            x_hi = tl.load(x_ptr + rm[:, None] * stride_xm + (cols + 16)[None, :],
                           mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w_lo = ((wb & 15).to(tl.float32) * s + mn).to(x_lo.dtype)
            w_hi = ((wb >> 4).to(tl.float32) * s + mn).to(x_lo.dtype)
            acc += tl.dot(x_lo, tl.trans(w_lo), input_precision="ieee")
            acc += tl.dot(x_hi, tl.trans(w_hi), input_precision="ieee")
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _int8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, NG, stride_xm, stride_ym,
                     G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + rk
            k_ok = cols < K
            wq = tl.load(w_ptr + rn[:, None] * K + cols[None, :],
                         mask=n_ok[:, None] & k_ok[None, :], other=0)
            s = tl.load(s_ptr + rn[:, None] * NG + (cols // G)[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + cols[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = (wq.to(tl.float32) * s).to(x.dtype)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def _grid(M: int, N: int):
    return (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))


def int4_linear(x: torch.Tensor, state) -> torch.Tensor:
    """y = x W^T for x [M, K] on the state's device, in x's dtype."""
    if triton is None or x.shape[0] >= WIDEN_FROM_ROWS:
        return widened_int4(x, state)
    x = x.contiguous()
    M, K = x.shape
    N, G = state.packed.shape[0], state.group_size
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _int4_kernel[_grid(M, N)](x, state.packed, state.scales, state.offsets, y, M, N, K,
                              state.scales.shape[1], x.stride(0), y.stride(0), G=G,
                              ZERO_FORM=bool(state.zero_form), BM=BLOCK_M, BN=BLOCK_N,
                              BK=BLOCK_K)
    return y


def int8_linear(x: torch.Tensor, state) -> torch.Tensor:
    """y = x W^T for x [M, K] on the state's device, in x's dtype."""
    if triton is None or x.shape[0] >= WIDEN_FROM_ROWS:
        return widened_int8(x, state)
    x = x.contiguous()
    M, K = x.shape
    N, G = state.qweight.shape[0], state.group_size
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _int8_kernel[_grid(M, N)](x, state.qweight, state.scales, y, M, N, K, state.scales.shape[1],
                              x.stride(0), y.stride(0), G=G, BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return y


def widened_int4(x: torch.Tensor, state) -> torch.Tensor:
    """The reference: the whole weight widened to x's dtype on its device, then a matmul."""
    n, half = state.packed.shape
    p = state.packed.reshape(n, half // 16, 1, 16)
    q = torch.cat([p & 15, p >> 4], dim=2).reshape(n, half * 2).float()
    s, mn = state.scale_min()
    cols = torch.arange(half * 2, device=q.device) // state.group_size
    return F.linear(x, (q * s[:, cols] + mn[:, cols]).to(x.dtype))


def widened_int8(x: torch.Tensor, state) -> torch.Tensor:
    q, g = state.qweight, state.group_size
    w = (q.float().reshape(q.shape[0], -1, g) * state.scales[:, :, None]).reshape(q.shape)
    return F.linear(x, w.to(x.dtype))

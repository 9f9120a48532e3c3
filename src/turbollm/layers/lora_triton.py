"""LoRA on CUDA: one Triton shrink and one Triton expand over the whole batch, each row reading
its own adapter slot (the bgmv form of Punica/S-LoRA), for any mix of adapters and base rows.

    shrink:  s[t, :]  = A[slot[t]] @ x[t]                  ([shards * R] per row)
    expand:  y[t, n] += B[slot[t], :, n] . s[t, shard(n) * R : shard(n) * R + R]

Rows with slot -1 (the base model) are skipped. On the GPU two launches replace the torch
path's two to four ops per adapter group; the factors are read once per row, which is what a
decode-sized batch costs anyway. Like the low-bit kernels, they run on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them without a GPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: layers/lora.py's torch path serves
    triton = None

BLOCK_K = 64  # input columns per shrink iteration
BLOCK_R = 32  # rows of A (shards x rank) per shrink program
BLOCK_N = 64  # output columns per expand program


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _shrink(x_ptr, a_ptr, slots_ptr, s_ptr, K, KR, stride_x, stride_as, stride_ar,
                stride_s, BK: tl.constexpr, BR: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(slots_ptr + row)
        if slot >= 0:
            r = tl.program_id(1) * BR + tl.arange(0, BR)
            acc = tl.zeros((BR,), dtype=tl.float32)
            for k0 in range(0, K, BK):
                k = k0 + tl.arange(0, BK)
                xk = tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
                a = tl.load(a_ptr + slot * stride_as + r[:, None] * stride_ar + k[None, :],
                            mask=(r[:, None] < KR) & (k[None, :] < K), other=0.0)
                acc += tl.sum(a.to(tl.float32) * xk[None, :], axis=1)
            tl.store(s_ptr + row * stride_s + r, acc, mask=r < KR)

    @triton.jit
    def _expand(s_ptr, b_ptr, slots_ptr, shard_ptr, y_ptr, N, R, stride_s, stride_bs,
                stride_br, stride_y, BN: tl.constexpr, BR: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(slots_ptr + row)
        if slot >= 0:
            n = tl.program_id(1) * BN + tl.arange(0, BN)
            r = tl.arange(0, BR)
            shard = tl.load(shard_ptr + n, mask=n < N, other=0)
            s = tl.load(s_ptr + row * stride_s + shard[:, None] * R + r[None, :],
                        mask=(n[:, None] < N) & (r[None, :] < R), other=0.0)
            b = tl.load(b_ptr + slot * stride_bs + n[:, None] + r[None, :] * stride_br,
                        mask=(n[:, None] < N) & (r[None, :] < R), other=0.0)
            delta = tl.sum(s * b.to(tl.float32), axis=1)
            y = tl.load(y_ptr + row * stride_y + n, mask=n < N, other=0.0)
            tl.store(y_ptr + row * stride_y + n, (y.to(tl.float32) + delta).to(y.dtype),
                     mask=n < N)


def output_shards(spans: list[tuple[int, int]], out_features: int, device) -> torch.Tensor:
    """int32 [out]: the shard index of each output column (its rows of s in the expand)."""
    shard = torch.empty(out_features, dtype=torch.int32)
    for j, (off, n) in enumerate(spans):
        shard[off:off + n] = j
    return shard.to(device)


def lora_add(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             slots: torch.Tensor, shard_of_col: torch.Tensor, rank: int) -> torch.Tensor:
    """y [T, out] += each row's adapter term (x [T, in]; A [slots, shards * R, in]; B [slots,
    R, out]; slots int [T], -1 = none); in place, returns y."""
    T, K = x.shape
    KR, N = A.shape[1], y.shape[1]
    x, y = x.contiguous(), y
    assert y.stride(1) == 1 and A.is_contiguous() and B.is_contiguous()
    s = torch.zeros(T, KR, dtype=torch.float32, device=x.device)
    slots = slots.to(device=x.device, dtype=torch.int32)
    _shrink[(T, triton.cdiv(KR, BLOCK_R))](x, A, slots, s, K, KR, x.stride(0), A.stride(0),
                                           A.stride(1), s.stride(0), BK=BLOCK_K, BR=BLOCK_R)
    _expand[(T, triton.cdiv(N, BLOCK_N))](s, B, slots, shard_of_col, y, N, rank, s.stride(0),
                                          B.stride(0), B.stride(1), y.stride(0), BN=BLOCK_N,
                                          BR=triton.next_power_of_2(rank))
    return y

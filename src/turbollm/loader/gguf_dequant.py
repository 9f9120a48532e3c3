"""Torch-vectorized dequantization of GGML tensor data (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).

Every function works on all blocks at once with tensor ops. Block layouts (ggml, little-endian):

  Q8_0  32 values, 34 bytes:  d fp16 | qs int8[32]                 x = d * q
  Q4_0  32 values, 18 bytes:  d fp16 | qs u8[16]                   x = d * (q - 8)
  Q4_1  32 values, 20 bytes:  d fp16 | m fp16 | qs u8[16]          x = d * q + m
        (Q4_0/Q4_1: low nibbles of qs are values 0..15, high nibbles values 16..31)
  Q4_K 256 values, 144 bytes: d fp16 | dmin fp16 | scales u8[12] | qs u8[128]
        8 sub-blocks of 32 with 6-bit scale sc and min m packed in `scales`;
        x = d * sc * q - dmin * m; qs chunk c (32 bytes) holds sub-block 2c (low nibbles)
        and 2c+1 (high nibbles)
  Q6_K 256 values, 210 bytes: ql u8[128] | qh u8[64] | scales int8[16] | d fp16
        q = (4 low bits from ql) | (2 high bits from qh) << 4, x = d * scale[i // 16] * (q - 32)
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K)


def as_uint8_tensor(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Raw bytes as a uint8 torch tensor, zero-copy where possible (keeps the leading dims)."""
    if isinstance(data, torch.Tensor):
        t = data.contiguous()
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    arr = np.ascontiguousarray(data)
    if arr.dtype != np.uint8:
        arr = arr.view(np.uint8)
    if not arr.flags.writeable:
        arr = arr.copy()  # torch.from_numpy warns on read-only memory
    return torch.from_numpy(arr)


def _fp16(b: torch.Tensor, start: int) -> torch.Tensor:
    """fp16 field at byte `start` of each block: uint8 [rows, nblk, type_size] -> fp16 [rows, nblk] (maybe a view)."""
    if b.shape[-1] % 2 == 0 and start % 2 == 0:
        try:  # zero-copy: read the whole block as fp16 words and pick one column
            return b.view(torch.float16)[..., start // 2]
        except RuntimeError:  # storage offset not 2-byte aligned
            pass
    return b[..., start : start + 2].contiguous().view(torch.float16).squeeze(-1)


def _blocks(raw: torch.Tensor, type_size: int) -> torch.Tensor:
    """Rows of whole blocks [rows, nblk * type_size] -> [rows, nblk, type_size]."""
    rows = raw.reshape(raw.shape[0] if raw.dim() > 1 else 1, -1)
    if rows.shape[1] % type_size:
        raise ValueError(f"{rows.shape[1]} bytes per row is not a multiple of the block size {type_size}")
    return rows.reshape(rows.shape[0], -1, type_size)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] packed bytes -> [..., 32] values 0..15: low nibbles first, then high nibbles."""
    out = torch.empty(*qs.shape[:-1], 2, qs.shape[-1], dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    torch.bitwise_right_shift(qs, 4, out=out[..., 1, :])
    return out.flatten(-2)


def q8_0_unpack(raw: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows uint8 [rows, cols/32*34] -> (q int8 [rows, cols], scale fp16 [rows, cols/32])."""
    b = _blocks(as_uint8_tensor(raw), 34)
    scale = _fp16(b, 0)
    q = b[..., 2:].view(torch.int8)  # same item size: a strided view, copied once by reshape
    return q.reshape(b.shape[0], -1), scale.contiguous()


def q4_0_unpack(raw: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 rows uint8 [rows, cols/32*18] -> (q uint8 0..15 [rows, cols], scale fp16 [rows, cols/32]).

    Value = (q - 8) * scale.
    """
    b = _blocks(as_uint8_tensor(raw), 18)
    scale = _fp16(b, 0)
    q = _nibbles(b[..., 2:])
    return q.reshape(b.shape[0], -1), scale.contiguous()


def q4_1_unpack(raw: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 rows uint8 [rows, cols/32*20] -> (q uint8 0..15 [rows, cols], scale, min fp16 [rows, cols/32]).

    Value = q * scale + min.
    """
    b = _blocks(as_uint8_tensor(raw), 20)
    scale = _fp16(b, 0)
    minimum = _fp16(b, 2)
    q = _nibbles(b[..., 4:])
    return q.reshape(b.shape[0], -1), scale.contiguous(), minimum.contiguous()


def q4_k_unpack(raw: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K rows -> (q uint8 [rows, cols], scale fp32 [rows, cols/32], min fp32 [rows, cols/32]); x = q*scale - min."""
    b = _blocks(as_uint8_tensor(raw), 144)
    rows, nblk = b.shape[:2]
    d = _fp16(b, 0).float()[..., None]  # [rows, nblk, 1]
    dmin = _fp16(b, 2).float()[..., None]
    s = b[..., 4:16]
    # 6-bit scales/mins of the 8 sub-blocks: j<4 live in the low 6 bits of bytes j (scale) and j+4 (min);
    # j>=4 take 4 bits from byte j+4 (low nibble scale, high nibble min) plus the top 2 bits of bytes j-4 / j.
    lo_sc, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], dim=-1)  # [rows, nblk, 8]
    mn = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=-1)
    # qs: 4 chunks of 32 bytes; chunk c -> sub-block 2c (low nibbles), 2c+1 (high nibbles)
    qs = b[..., 16:].reshape(rows, nblk, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(rows, nblk * 256)
    # Same association as ggml: (d*sc) * q - (dmin*m), so results are bit-identical.
    scale = (d * sc.float()).reshape(rows, nblk * 8)
    minimum = (dmin * mn.float()).reshape(rows, nblk * 8)
    return q, scale, minimum


def q6_k_unpack(raw: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K rows -> (q int8 -32..31 [rows, cols], scale fp32 [rows, cols/16]); x = q*scale."""
    b = _blocks(as_uint8_tensor(raw), 210)
    rows, nblk = b.shape[:2]
    # Each 256-value block is two halves of 128: half h uses ql[64h:64h+64], qh[32h:32h+32].
    ql = b[..., 0:128].reshape(rows, nblk, 2, 2, 32)  # [.., half, j, l]: bytes l and l+32
    qh = b[..., 128:192].reshape(rows, nblk, 2, 1, 32)
    # Values 32k + l of a half, k = 0..3: low bits from ql[l] (k=0), ql[l+32] (k=1) low nibbles,
    # then the same bytes' high nibbles (k=2, 3); high 2 bits from qh[l] >> 2k.
    low = torch.cat([ql & 0x0F, ql >> 4], dim=3)  # [rows, nblk, 2, 4, 32]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 1, 4, 1)
    high = (qh >> shifts) & 3
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(rows, nblk * 256)
    sc = b[..., 192:208].contiguous().view(torch.int8).float()  # [rows, nblk, 16], one per 16 values
    d = _fp16(b, 208).float()[..., None]
    return q, (d * sc).reshape(rows, nblk * 16)


def dequantize(ggml_type: int | QT, data: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize raw GGML bytes to a new float32 tensor of `shape` (row-major, e.g. [out, in]) on the bytes' device."""
    qtype = QT(int(ggml_type))
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"GGML type {qtype.name} is not supported (supported: {[t.name for t in SUPPORTED_TYPES]})")
    raw = as_uint8_tensor(data).reshape(-1)
    block, type_size = GGML_QUANT_SIZES[qtype]
    numel = int(np.prod(shape)) if len(shape) else 1
    if raw.numel() != numel // block * type_size or numel % block:
        raise ValueError(f"{qtype.name}: {raw.numel()} bytes do not hold a tensor of shape {tuple(shape)}")
    if qtype == QT.F32:
        out = raw.view(torch.float32).clone()  # clone: never hand out a view of the mapped file
    elif qtype == QT.F16:
        out = raw.view(torch.float16).float()
    elif qtype == QT.BF16:
        out = raw.view(torch.bfloat16).float()
    else:
        # Treat each block as one row: [nblk, type_size] -> values [nblk, block], scales [nblk, 1]
        rows = raw.reshape(-1, type_size)
        # Mixed-dtype products (int8/uint8 x fp32) promote inside one kernel: no fp32 copy of q.
        if qtype == QT.Q8_0:
            q, d = q8_0_unpack(rows)
            out = q * d.float()
        elif qtype == QT.Q4_0:
            q, d = q4_0_unpack(rows)
            out = (q.view(torch.int8) - 8) * d.float()
        elif qtype == QT.Q4_1:
            q, d, m = q4_1_unpack(rows)
            out = (q * d.float()).add_(m.float())
        elif qtype == QT.Q4_K:
            q, d, m = q4_k_unpack(rows)
            out = (q.reshape(-1, 8, 32) * d[..., None]).sub_(m[..., None])
        else:  # Q6_K
            q, d = q6_k_unpack(rows)
            out = q.reshape(-1, 16, 16) * d[..., None]
    return out.reshape(shape)

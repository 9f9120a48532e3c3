"""Quantized paged KV cache: int8 with per-token, per-head scales, or fp8 e4m3.

int8: each token's K (and V) vector of each head is stored as int8 with one fp16 scale,
amax / 127 — 1 byte per value + 2 bytes per head and token, about half of bf16 for head_dim 64+.
fp8 e4m3: values cast to float8_e4m3fn (clamped to its +-448 range), no scale — the storage
format torch offers on every device; math stays in the activations' dtype. CPU kernels cannot
index_copy fp8, so the bytes are moved through a uint8 view.

Attention quantizes on write and dequantizes what it gathers on read (torch_sdpa.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KV_QUANT_DTYPES = ("int8", "fp8_e4m3")
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0


@dataclass
class QuantKV:
    """One layer's K or V cache. data: int8 / uint8 (fp8 bytes) [num_blocks, bs, KVH, D];
    scale: fp16 [num_blocks, bs, KVH] (int8 only)."""

    data: torch.Tensor
    scale: torch.Tensor | None
    kind: str

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def write(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        """Store x: [T, KVH, D] at flat slot indices."""
        kvh, d = x.shape[1], x.shape[2]
        if self.kind == "int8":
            xf = x.float()
            scale = (xf.abs().amax(-1) / 127.0).clamp(min=1e-8).half()  # [T, KVH]
            q = torch.round(xf / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
            self.data.view(-1, kvh, d).index_copy_(0, slots, q)
            self.scale.view(-1, kvh).index_copy_(0, slots, scale)
        else:
            q = x.float().clamp(-_FP8_MAX, _FP8_MAX).to(_FP8).view(torch.uint8)
            self.data.view(-1, kvh, d).index_copy_(0, slots, q)

    def read(self, index, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized data[index] (block ids, any shape) as `dtype`: [..., bs, KVH, D]."""
        if self.kind == "int8":
            return (self.data[index].to(dtype) * self.scale[index].unsqueeze(-1).to(dtype))
        return self.data[index].view(_FP8).to(dtype)


@dataclass
class QuantKVCache:
    """The whole cache: data [layers, 2, num_blocks, bs, KVH, D] (+ scale [layers, 2, ...])."""

    data: torch.Tensor
    scale: torch.Tensor | None
    kind: str

    def layer_views(self) -> list[tuple[QuantKV, QuantKV]]:
        def one(i, j):
            return QuantKV(self.data[i, j], None if self.scale is None else self.scale[i, j],
                           self.kind)
        return [(one(i, 0), one(i, 1)) for i in range(self.data.shape[0])]


def allocate_quant_kv_cache(layers: int, num_blocks: int, block_size: int, kv_heads: int,
                            head_dim: int, kind: str, device) -> QuantKVCache:
    """Zeroed (a zero scale dequantizes unwritten slots to 0, never NaN)."""
    if kind not in KV_QUANT_DTYPES:
        raise ValueError(f"unknown quantized KV-cache dtype {kind!r}")
    shape = (layers, 2, num_blocks, block_size, kv_heads, head_dim)
    if kind == "int8":
        return QuantKVCache(torch.zeros(shape, dtype=torch.int8, device=device),
                            torch.zeros(shape[:-1], dtype=torch.float16, device=device), kind)
    return QuantKVCache(torch.zeros(shape, dtype=torch.uint8, device=device), None, kind)


def scale_bytes_per_head(kind: str) -> int:
    """Bytes of per-token, per-head scale a cache of this dtype keeps (K and V each)."""
    return 2 if kind == "int8" else 0

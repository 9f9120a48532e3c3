"""The AVX2 paged decode attention of csrc/paged_attn.c, and when it can serve a call."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from turbollm.attention.kv_quant import QuantKV
from turbollm.native_build import F32, I64, PTR, load_library

_SRC = Path(__file__).parent / "csrc" / "paged_attn.c"
_SIGNATURES = {
    "paged_attn_rows": [PTR, PTR, PTR, PTR, PTR, I64, PTR, I64, PTR, PTR, PTR, I64, I64, I64,
                        I64, I64, F32, I64],
}
_KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_KV_INT8 = 3


@functools.cache
def lib():
    """The loaded kernel library, or None where it cannot run here (then torch serves)."""
    return load_library(_SRC, _SIGNATURES)


def _parts(cache) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """(values, fp16 scales or None, kernel dtype code) of a cache the kernel reads, else None."""
    if isinstance(cache, QuantKV):
        return (cache.data, cache.scale, _KV_INT8) if cache.kind == "int8" else None
    if isinstance(cache, torch.Tensor) and cache.dtype in _KV_DTYPES:
        return cache, None, _KV_DTYPES[cache.dtype]
    return None


def supports(q: torch.Tensor, k_cache) -> bool:
    """True when the C kernel can attend q [R, H, D] over this cache on this machine."""
    parts = _parts(k_cache)
    if parts is None:
        return False  # e.g. an fp8 cache
    if q.device.type != "cpu" or q.dtype != torch.float32 or not parts[0].is_contiguous():
        return False
    d, kvh = q.shape[2], k_cache.shape[2]
    return d % 8 == 0 and q.shape[1] % kvh == 0 and lib() is not None


def paged_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tables: torch.Tensor, seq: torch.Tensor, ctx: torch.Tensor,
                         scale: float, window: int | None) -> torch.Tensor:
    """Attention of query rows q [R, H, D] (fp32) over paged K/V caches [NB, BS, KVH, D]
    (tensors, or int8 QuantKV caches).

    Row r attends to the first ctx[r] tokens of sequence seq[r], whose blocks are
    tables[seq[r]] (int64 [S, max_blocks]); with a sliding window, only the last `window`.
    """
    R, H, D = q.shape
    BS, KVH = k_cache.shape[1], k_cache.shape[2]
    q = q.contiguous()
    tables, seq, ctx = tables.contiguous(), seq.contiguous(), ctx.contiguous()
    out = torch.empty_like(q)
    (k, ks, code), (v, vs, _) = _parts(k_cache), _parts(v_cache)
    lib().paged_attn_rows(q.data_ptr(), k.data_ptr(), v.data_ptr(),
                          ks.data_ptr() if ks is not None else None,
                          vs.data_ptr() if vs is not None else None,
                          code, tables.data_ptr(), tables.shape[1],
                          seq.data_ptr(), ctx.data_ptr(), out.data_ptr(), R, H, KVH, D, BS,
                          scale, window or 0)
    return out

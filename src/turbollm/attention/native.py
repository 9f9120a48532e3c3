"""The AVX2 paged decode attention of csrc/paged_attn.c, and when it can serve a call."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from turbollm.attention.kv_quant import QuantKV
from turbollm.native_build import F32, I64, PTR, load_library

_SRC = Path(__file__).parent / "csrc" / "paged_attn.c"
_SIGNATURES = {
    "paged_attn_rows": [PTR, I64, PTR, PTR, PTR, PTR, I64, PTR, I64, PTR, PTR, PTR, I64, I64,
                        I64, I64, I64, F32, I64],
    "write_kv_rows": [PTR, PTR, I64, PTR, PTR, PTR, PTR, I64, PTR, I64, I64, I64],
    "paged_attn_force_item_rows": [I64],
}
_KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_KV_QUANT = {"int8": 3, "fp8_e4m3": 4}
MAX_HEAD_DIM = 1024  # MAX_HEAD_DIM in paged_attn.c (its row of zeros for padding)
# Query chunks up to this many rows (speculative verification, short prompt chunks) attend row
# by row in C, each row over the cache up to its own token, on the module path and the C decode
# path alike (so both give the same bits); past it a chunk's rows are better done together.
MAX_ROW_CHUNK = 64


@functools.cache
def lib():
    """The loaded kernel library, or None where it cannot run here (then torch serves)."""
    return load_library(_SRC, _SIGNATURES)


def cache_parts(cache) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """(values, fp16 scales or None, kernel dtype code) of a cache the kernel reads, else None."""
    if isinstance(cache, QuantKV):
        return cache.data, cache.scale, _KV_QUANT[cache.kind]
    if isinstance(cache, torch.Tensor) and cache.dtype in _KV_DTYPES:
        return cache, None, _KV_DTYPES[cache.dtype]
    return None


def supports(q: torch.Tensor, k_cache) -> bool:
    """True when the C kernel can attend q [R, H, D] over this cache on this machine."""
    parts = cache_parts(k_cache)
    if parts is None:
        return False  # e.g. a cache in a dtype the kernel has no loader for
    if q.device.type != "cpu" or q.dtype != torch.float32 or not parts[0].is_contiguous():
        return False
    d, kvh = q.shape[2], k_cache.shape[2]
    return (d % 8 == 0 and d <= MAX_HEAD_DIM and q.shape[1] % kvh == 0
            and lib() is not None)


def paged_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tables: torch.Tensor, seq: torch.Tensor, ctx: torch.Tensor,
                         scale: float, window: int | None) -> torch.Tensor:
    """Attention of query rows q [R, H, D] (fp32) over paged K/V caches [NB, BS, KVH, D]
    (tensors, or int8 / fp8 QuantKV caches).

    Row r attends to the first ctx[r] tokens of sequence seq[r], whose blocks are
    tables[seq[r]] (int64 [S, max_blocks]); with a sliding window, only the last `window`.
    """
    R, H, D = q.shape
    out = torch.empty(R, H, D)
    tables, seq, ctx, q = tables.contiguous(), seq.contiguous(), ctx.contiguous(), q.contiguous()
    attend = bind_rows(k_cache, v_cache, tables, seq, ctx, H, D, scale, window)
    attend(q.data_ptr(), q.stride(0), out.data_ptr(), R)
    return out


def bind_rows(k_cache, v_cache, tables: torch.Tensor, seq: torch.Tensor, ctx: torch.Tensor,
              heads: int, head_dim: int, scale: float, window: int | None):
    """paged_attention_rows as fn(q_ptr, q_row_stride, out_ptr, R) with everything else bound
    (contiguous int64 tables, seq, ctx, which the caller keeps alive): the decoder binds one per
    layer per step, as per-call tensor checks cost as much as the attention of a short context."""
    BS, KVH = k_cache.shape[1], k_cache.shape[2]
    (k, ks, code), (v, vs, _) = cache_parts(k_cache), cache_parts(v_cache)
    args = (k.data_ptr(), v.data_ptr(), ks.data_ptr() if ks is not None else None,
            vs.data_ptr() if vs is not None else None, code, tables.data_ptr(), tables.shape[1],
            seq.data_ptr(), ctx.data_ptr())
    tail = (heads, KVH, head_dim, BS, scale, window or 0)
    call = lib().paged_attn_rows
    return lambda q, q_stride, out, R: call(q, q_stride, *args, out, R, *tail)


def bind_write(k_cache, v_cache):
    """fn(k_ptr, v_ptr, row_stride, slots_ptr, T) storing T new fp32 K/V rows (KVH x D values
    each, rows row_stride floats apart) at flat int64 slots, converted as torch converts them
    (bf16/fp16 round to nearest even; int8 and fp8 as QuantKV.write); None for a cache it
    cannot write."""
    kp, vp = cache_parts(k_cache), cache_parts(v_cache)
    if (kp is None or vp is None or lib() is None
            or not (kp[0].is_contiguous() and vp[0].is_contiguous())):
        return None
    KVH, D = k_cache.shape[2], k_cache.shape[3]
    args = (kp[0].data_ptr(), vp[0].data_ptr(), kp[1].data_ptr() if kp[1] is not None else None,
            vp[1].data_ptr() if vp[1] is not None else None, kp[2])
    call = lib().write_kv_rows
    return lambda k, v, stride, slots, T: call(k, v, stride, *args, slots, T, KVH, D)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache, v_cache, slots: torch.Tensor) -> bool:
    """Store new K/V rows k, v [T, KVH, D] (fp32) at flat cache slots in one C call (see
    bind_write); False when the C kernel cannot take these inputs (then the caller uses torch)."""
    if (k.dtype != torch.float32 or v.dtype != torch.float32 or k.device.type != "cpu"
            or k.stride() != v.stride() or k.stride(2) != 1 or k.stride(1) != k.shape[2]
            or slots.dtype != torch.int64):
        return False
    write = bind_write(k_cache, v_cache)
    if write is None:
        return False
    slots = slots.contiguous()
    write(k.data_ptr(), v.data_ptr(), k.stride(0), slots.data_ptr(), k.shape[0])
    return True

"""Reference attention on the paged KV cache in plain PyTorch (CPU and CUDA).

Decodes are batched: on x86 CPUs with AVX2 a C kernel (attention/native.py) reads each
sequence's blocks in place; elsewhere each sequence's blocks are gathered into a padded
[B, L, KVH, D] view and attended in one einsum. Prefill chunks are attended one sequence at a time with SDPA, except
short ones over a longer cached context (speculative verification), which use einsums too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from turbollm.attention import native
from turbollm.attention.backend import AttentionBackend, AttentionMetadata
from turbollm.attention.kv_quant import QuantKV

# Multi-token chunks with at most this many queries over a longer context take the einsum path.
SMALL_QUERY = 16


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new K/V at their slots. k, v: [T, KVH, D]; caches: [num_blocks, bs, KVH, D]."""
    if k.shape[0] <= SMALL_QUERY and native.write_kv(k, v, k_cache, v_cache, slot_mapping):
        return  # decode-sized: one C call instead of four aten ops
    if isinstance(k_cache, QuantKV):  # int8 / fp8 cache: quantize on write
        k_cache.write(k, slot_mapping)
        v_cache.write(v, slot_mapping)
        return
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_ids: torch.Tensor, length: int,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """One sequence's first `length` cached tokens: [length, KVH, D]."""
    bs = cache.shape[1]
    n_blocks = -(-length // bs)
    return read_blocks(cache, block_ids[:n_blocks], dtype).flatten(0, 1)[:length]


def read_blocks(cache, index: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """cache[index] ([..., bs, KVH, D]); a quantized cache is dequantized to `dtype` on read."""
    if isinstance(cache, QuantKV):
        return cache.read(index, dtype)
    return cache[index]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale, sliding_window)
        for start, qlen, ctx_len, block_ids in meta.prefills:
            end = start + qlen
            if qlen <= native.MAX_ROW_CHUNK and native.supports(q, k_cache):
                # A few queries (speculative verification, a short prompt chunk): row i sees
                # the first ctx_len - qlen + 1 + i tokens, read in place.
                key = ("few_query_rows", start)
                rows = meta.derived.get(key)
                if rows is None:  # same for every layer: build once per step
                    rows = meta.derived[key] = (block_ids.unsqueeze(0),
                                                torch.zeros(qlen, dtype=torch.long),
                                                torch.arange(ctx_len - qlen + 1, ctx_len + 1))
                out[start:end] = native.paged_attention_rows(q[start:end], k_cache, v_cache,
                                                             *rows, scale, sliding_window)
                continue
            if ctx_len == qlen:  # the whole context is new: attend to the fresh K/V directly
                kc, vc = k[start:end], v[start:end]
            else:
                kc = gather_context(k_cache, block_ids, ctx_len, q.dtype)
                vc = gather_context(v_cache, block_ids, ctx_len, q.dtype)
            out[start:end] = self._prefill(q[start:end], kc, vc, scale, sliding_window,
                                           meta.derived, start)
        return out

    @staticmethod
    def _prefill(q, k, v, scale, window, derived: dict, seq_key: int) -> torch.Tensor:
        # q: [n, H, D] are the last n positions of a context of k/v: [L, KVH, D]
        n, L = q.shape[0], k.shape[0]
        if n <= SMALL_QUERY and n < L:
            return TorchAttentionBackend._few_queries(q, k, v, scale, window, derived, seq_key)
        # [1, heads, tokens, D] with K/V heads expanded: with 3-D inputs or enable_gqa=True,
        # CPU SDPA falls back to its math path, which materializes [H, n, L] scores.
        group = q.shape[1] // k.shape[1]
        qt = q.transpose(0, 1).unsqueeze(0)
        kt = k.to(q.dtype).repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        vt = v.to(q.dtype).repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        if window is None and n == L:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
        else:
            key = ("prefill_mask", seq_key, window)
            mask = derived.get(key)
            if mask is None:  # same for every layer: build once per step
                q_pos = torch.arange(L - n, L, device=q.device).unsqueeze(1)
                k_pos = torch.arange(L, device=q.device).unsqueeze(0)
                mask = k_pos <= q_pos
                if window is not None:
                    mask &= k_pos > q_pos - window
                derived[key] = mask
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        return o[0].transpose(0, 1)

    @staticmethod
    def _few_queries(q, k, v, scale, window, derived: dict, seq_key: int) -> torch.Tensor:
        """A few queries over a long cached context (speculative verification, short chunks):
        the decode path's grouped einsums, which skip SDPA's set-up and the K/V head copies."""
        n, H, D = q.shape
        L, kvh = k.shape[0], k.shape[1]
        key = ("few_queries_invalid", seq_key, window)
        invalid = derived.get(key)
        if invalid is None:  # same for every layer: build once per step
            q_pos = torch.arange(L - n, L, device=q.device).unsqueeze(1)
            k_pos = torch.arange(L, device=q.device).unsqueeze(0)
            invalid = k_pos > q_pos
            if window is not None:
                invalid |= k_pos <= q_pos - window
            invalid = derived[key] = invalid[None, None]  # [1, 1, n, L]
        qg = q.view(n, kvh, H // kvh, D)
        scores = torch.einsum("nkgd,lkd->kgnl", qg, k.to(q.dtype)).float() * scale
        scores.masked_fill_(invalid, float("-inf"))
        probs = scores.softmax(-1).to(q.dtype)
        return torch.einsum("kgnl,lkd->nkgd", probs, v.to(q.dtype)).reshape(n, H, D)

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale, window) -> torch.Tensor:
        # q: [B, H, D]; one new token per sequence, at position seq_len - 1.
        B, H, D = q.shape
        if native.supports(q, k_cache):  # reads the blocks in place: no gather, no padding
            rows = meta.derived.get("decode_rows")
            if rows is None:
                rows = meta.derived["decode_rows"] = torch.arange(B)
            return native.paged_attention_rows(q, k_cache, v_cache, meta.decode_block_tables,
                                               rows, meta.decode_seq_lens, scale, window)
        kvh = k_cache.shape[2]
        tables, seq_lens = meta.decode_block_tables, meta.decode_seq_lens
        k = read_blocks(k_cache, tables, q.dtype).flatten(1, 2)  # [B, L, KVH, D]
        v = read_blocks(v_cache, tables, q.dtype).flatten(1, 2)  # L = max_blocks * block_size
        qg = q.view(B, kvh, H // kvh, D)  # query heads grouped by the KV head they share
        scores = torch.einsum("bkgd,blkd->bkgl", qg, k.to(q.dtype)).float() * scale
        key = ("decode_invalid", window)
        invalid = meta.derived.get(key)
        if invalid is None:  # same for every layer: build once per step
            pos = torch.arange(k.shape[1], device=q.device).unsqueeze(0)
            invalid = pos >= seq_lens.unsqueeze(1)  # [B, L]: padding and unwritten slots
            if window is not None:
                invalid |= pos <= seq_lens.unsqueeze(1) - 1 - window
            invalid = meta.derived[key] = invalid[:, None, None, :]
        scores.masked_fill_(invalid, float("-inf"))
        probs = scores.softmax(-1).to(q.dtype)
        out = torch.einsum("bkgl,blkd->bkgd", probs, v.to(q.dtype))
        return out.reshape(B, H, D)

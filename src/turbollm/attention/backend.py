"""Attention backend interface and the per-step metadata every backend reads.

Layout of one step's flat batch: sequences with a single query token (decodes) come first,
then sequences with several (prefill chunks, recomputes). The paged KV cache of one layer is
`k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to."""

    # Cache slot (block_id * block_size + offset) of each new token: [num_tokens]
    slot_mapping: torch.Tensor
    # Number of leading single-token (decode) sequences; their tokens are the first ones.
    num_decodes: int
    # Decode part, batched: block tables padded with 0 [num_decodes, max_blocks] and
    # context lengths (incl. the new token) [num_decodes].
    decode_block_tables: torch.Tensor | None
    decode_seq_lens: torch.Tensor | None
    # Multi-token part, one entry per sequence (Python ints, looped over):
    # (first token index in the flat batch, query length, context length, block ids tensor).
    prefills: list[tuple[int, int, int, torch.Tensor]]
    block_size: int
    # Tensors a backend derives from the fields above once per step and reuses in every layer.
    derived: dict = field(default_factory=dict)


class AttentionBackend:
    """Writes the new K/V into the cache and attends over each sequence's cached context."""

    name = "base"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, KVH, D] -> out: [T, H, D]."""
        raise NotImplementedError


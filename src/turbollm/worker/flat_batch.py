"""Lay out several sequences' new tokens as one flat batch for a paged forward pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from turbollm.attention.backend import AttentionMetadata


@dataclass
class SeqChunk:
    """New tokens of one sequence: token_ids at positions start.., KV in `block_table`."""

    token_ids: list[int]
    start: int
    block_table: list[int]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    offsets: list[int]  # first row of each chunk (in the caller's order)


def pack_sequences(chunks: list[SeqChunk], block_size: int, device: torch.device
                   ) -> PackedBatch:
    """Single-token chunks (decodes) first, batched; longer ones after, one attention each."""
    bs = block_size
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids) != 1)
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    offsets = [0] * len(chunks)
    dec_tables, dec_lens, prefills = [], [], []
    for i in order:
        c = chunks[i]
        n, end, table = len(c.token_ids), c.start + len(c.token_ids), c.block_table
        offsets[i] = len(ids)
        ids.extend(c.token_ids)
        pos.extend(range(c.start, end))
        slots.extend(table[p // bs] * bs + p % bs for p in range(c.start, end))
        if n == 1:
            dec_tables.append(table)
            dec_lens.append(end)
        else:
            prefills.append((offsets[i], n, end, torch.tensor(table, dtype=torch.long)))
    dev = device
    num_decodes = len(dec_lens)
    dec_bt = dec_sl = None
    if num_decodes:
        width = max(len(t) for t in dec_tables)
        dec_bt = _long_tensor([t + [0] * (width - len(t)) for t in dec_tables], dev)
        dec_sl = _long_tensor(dec_lens, dev)
    if dev.type != "cpu":
        prefills = [(a, b, c, t.to(dev, non_blocking=True)) for a, b, c, t in prefills]
    meta = AttentionMetadata(
        slot_mapping=_long_tensor(slots, dev),
        num_decodes=num_decodes, decode_block_tables=dec_bt, decode_seq_lens=dec_sl,
        prefills=prefills, block_size=bs)
    return PackedBatch(_long_tensor(ids, dev), _long_tensor(pos, dev), meta, offsets)


def _long_tensor(values, device: torch.device) -> torch.Tensor:
    # made on the CPU, then copied without waiting; no .to() call at all on the CPU (each call
    # costs a few us of a decode step)
    t = torch.tensor(values, dtype=torch.long)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)

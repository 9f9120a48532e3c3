"""Tensor-parallel layers: each rank holds a slice of a weight and loads only that slice.

- column-parallel (QKV, gate/up): each rank computes its heads / MLP columns; no communication;
- row-parallel (o_proj, down_proj): each rank multiplies its input slice by its column slice of
  W and the partial sums are added by one all-reduce;
- vocab-parallel embedding and LM head: each rank holds ceil(V / T) vocabulary rows; the
  embedding zeroes ids it does not hold and all-reduces, the head all-gathers the logits.

Checkpoint tensors arrive whole (one at a time) and each parameter's `weight_loader` narrows them
to the rank's slice before copying, so the model never holds more than its slice. Quantization
at load (int8/int4/fp8) then quantizes the slice. `checkpoint_slice` says which part of a full
checkpoint tensor a layer holds, for readers of packed forms (GGUF blocks, loader/gguf_native.py).
"""
from __future__ import annotations

import torch
from torch import nn

from turbollm.distributed.parallel_state import TPGroup
from turbollm.layers.linear import MergedLinear, QKVLinear, ReplicatedLinear


def checkpoint_slice(layer, shard_id=None) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """((first row, rows), (first column, columns)) of a full checkpoint tensor (one shard of a
    fused layer) that `layer` holds; None for a whole dimension. Rows may run past the tensor's
    end (the vocab-parallel head's padding: zeros)."""
    if isinstance(layer, ColumnQKVLinear):
        return ((layer.q_start, layer.q_size) if shard_id == "q"
                else (layer.kv_start, layer.kv_size)), None
    if isinstance(layer, ColumnMergedLinear):
        rows = layer.out_sizes[shard_id]
        return (layer.tp_rank * rows, rows), None
    if isinstance(layer, RowParallelLinear):
        return None, (layer.in_start, layer.in_features)
    if isinstance(layer, VocabParallelLMHead):
        return (layer.start, layer.out_features), None
    return None, None


def reads_slices(weight_loader) -> bool:
    """Whether a parameter's weight_loader reads only its rank's slice of a checkpoint tensor
    (through `narrow` or row slicing), so that it may be handed a lazy one
    (loader/lazy_tensor.py)."""
    return isinstance(getattr(weight_loader, "__self__", None), _SLICING_LAYERS)


def slice_checkpoint_rows(t: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    """Rows [start, start + n) of t along dim 0, zero-padded past its end."""
    if rows is None:
        return t
    start, n = rows
    part = t[start:start + n]
    if part.shape[0] < n:
        part = torch.cat([part, part.new_zeros(n - part.shape[0], *part.shape[1:])])
    return part


class ColumnQKVLinear(QKVLinear):
    """This rank's query heads and KV heads of a fused QKV projection."""

    def __init__(self, hidden_size: int, head_dim: int, q_heads: int, kv_start: int,
                 kv_heads: int, tp_rank: int, bias: bool = False, **kw):
        super().__init__(hidden_size, q_heads * head_dim, kv_heads * head_dim, bias, **kw)
        self.q_start = tp_rank * q_heads * head_dim  # rows of the full q_proj
        self.kv_start = kv_start * head_dim  # rows of the full k_proj / v_proj

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        rows, _ = checkpoint_slice(self, shard_id)
        super().weight_loader(param, loaded.narrow(0, *rows), shard_id)


class ColumnMergedLinear(MergedLinear):
    """This rank's 1/T of each fused projection's output rows (gate_proj and up_proj)."""

    def __init__(self, in_features: int, full_sizes: list[int], tp_size: int, tp_rank: int,
                 bias: bool = False, **kw):
        for s in full_sizes:
            if s % tp_size:
                raise ValueError(f"tensor_parallel_size {tp_size} must divide {s}")
        super().__init__(in_features, [s // tp_size for s in full_sizes], bias, **kw)
        self.tp_rank = tp_rank

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        rows, _ = checkpoint_slice(self, shard_id)
        super().weight_loader(param, loaded.narrow(0, *rows), shard_id)


class RowParallelLinear(ReplicatedLinear):
    """y = sum over ranks of x_r W_r^T, with x_r this rank's input slice and W_r the matching
    columns of W: one all-reduce per call. No bias (Llama's o/down have none; a bias would have
    to be added once, after the sum)."""

    def __init__(self, full_in: int, out_features: int, group: TPGroup, **kw):
        if full_in % group.size:
            raise ValueError(f"tensor_parallel_size {group.size} must divide {full_in}")
        super().__init__(full_in // group.size, out_features, bias=False, **kw)
        self.group = group
        self.in_start = group.rank * self.in_features

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        _, cols = checkpoint_slice(self, shard_id)
        super().weight_loader(param, loaded.narrow(1, *cols), shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce_(super().forward(x).contiguous())


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding table; ids elsewhere give zeros here and
    their row from the rank holding it, through one all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, group: TPGroup, start: int,
                 rows: int, dtype=None, device=None):
        super().__init__()
        self.group, self.start, self.rows = group, start, rows
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        param.data.copy_(slice_checkpoint_rows(loaded, (self.start, self.rows)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        h = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside.unsqueeze(-1), 0)
        return self.group.all_reduce_(h.contiguous())


class VocabParallelLMHead(ReplicatedLinear):
    """This rank's vocabulary rows of the LM head; `gather` joins every rank's logits."""

    def __init__(self, hidden_size: int, vocab_size: int, group: TPGroup, start: int, rows: int,
                 **kw):
        super().__init__(hidden_size, rows, **kw)
        self.group, self.start, self.vocab_size = group, start, vocab_size

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        param.data.copy_(slice_checkpoint_rows(loaded, checkpoint_slice(self)[0]))

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: [R, rows] per rank -> [R, vocab_size] (padding rows dropped)
        return self.group.all_gather_last(logits)[..., :self.vocab_size]


_SLICING_LAYERS = (ColumnQKVLinear, ColumnMergedLinear, RowParallelLinear,
                   VocabParallelEmbedding, VocabParallelLMHead)

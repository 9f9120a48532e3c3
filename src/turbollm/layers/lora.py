"""LoRA on a linear layer: adapter weights in slots, added to the base output per row.

A layer with adapters gets a `LinearLoRA` (as `layer.lora`; LinearBase.forward adds its term
after the quant method's output, so every base weight type takes adapters: dense, int8, int4,
GGUF, fp8). It keeps, for `num_slots` adapters at once, the low-rank factors stacked:

    A: [slots, shards * R, in]    each fused shard's A in its own R rows (q | k | v, gate | up)
    B: [slots, R, out]            each shard's B (transposed) in its own output columns, scaling
                                  folded in: the expand walks output columns in vectors

R is the slot rank: adapters of a smaller rank are zero-padded (exact: padded rows of A meet
padded columns of B), and a larger adapter grows every slot (`grow`). A shard an adapter does
not target has zero factors in that slot. `ranks` [slots, shards] keeps each slot's real rank
per shard (0: not targeted), so that the C kernel reads no padding: a rank-8 adapter costs
rank-8 bytes a step beside a rank-64 one.

Which rows use which slot is one `LoRAStep` per forward pass, shared by every layer of the
model through a `LoRAContext` (the runner sets it before the pass and clears it after). Rows of
one adapter are grouped (Punica's shrink/expand, one group per adapter): the base projection
has already run once for the whole batch; per group, shrink = x_g A^T ([n, shards * R]), then
expand = shrink_j B_j^T per shard, added to y_g. A prompt chunk's rows are contiguous (a slice,
no copy); decode rows of one adapter among others' are gathered by index. We group rather than
gather A and B per row (a bgmv): a per-row gather copies R x d_in + d_out x R values per row,
megabytes per projection at 64 decode rows, where grouping costs at most max_loras small
matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from turbollm.layers import lora_triton, native_ops
from turbollm.layers import prefill_gemm as multi_row


# Slot dtypes the C row kernel reads: dtype -> (function, the decode ABI's LORA_KIND name)
_C_KINDS = {torch.float32: ("lora_rows_f32", "LORA_KIND_F32"),
            torch.bfloat16: ("lora_rows_bf16", "LORA_KIND_BF16")}

# Rows up to which the C kernel adds the LoRA term (all rows in one threaded call: decode
# batches, short prompt chunks); more rows (prefill) go to torch's matmuls per adapter group,
# where the arithmetic outweighs torch's per-op cost. 64: the most rows the native decode step
# takes. Row-invariant steps (a seeded request's batch) keep the C kernel at any row count: it
# computes each row alone, where torch's matmul sums depend on the group's size.
MAX_C_ROWS = 64


@dataclass
class LoRAStep:
    """The rows of one forward pass that use each adapter slot (base rows are in none)."""

    # (slot, rows): rows a slice of the flat batch when contiguous, else a LongTensor [n]
    groups: list[tuple[int, slice | torch.Tensor]]
    # (first row, rows, slot) per chunk, as given (for the per-row slots of the C kernel)
    spans: list[tuple[int, int, int]] = None
    _row_slots: torch.Tensor | None = None

    _device_slots: torch.Tensor | None = None

    def row_slots(self) -> torch.Tensor:
        """int64 [T] slot of each row of the pass (-1: base), made once, on the CPU."""
        if self._row_slots is None:
            T = max(start + n for start, n, _ in self.spans)
            slots = torch.full((T,), -1, dtype=torch.long)
            for start, n, slot in self.spans:
                slots[start:start + n] = slot
            self._row_slots = slots
        return self._row_slots

    def row_slots_on(self, device: torch.device) -> torch.Tensor:
        """row_slots as int32 on `device`, copied there once per pass (every layer reads it)."""
        if self._device_slots is None or self._device_slots.device != device:
            self._device_slots = self.row_slots().to(device=device, dtype=torch.int32)
        return self._device_slots

    @classmethod
    def from_spans(cls, spans: list[tuple[int, int, int]], device: torch.device
                   ) -> "LoRAStep | None":
        """From (first row, rows, slot) per chunk of the flat batch (slot -1: the base model);
        None when no row has an adapter."""
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for start, n, slot in sorted(spans):
            if slot < 0 or n == 0:
                continue
            runs = by_slot.setdefault(slot, [])
            if runs and runs[-1][1] == start:  # adjacent chunks of one adapter: one run
                runs[-1] = (runs[-1][0], start + n)
            else:
                runs.append((start, start + n))
        if not by_slot:
            return None
        groups = []
        for slot, runs in by_slot.items():
            if len(runs) == 1:
                groups.append((slot, slice(*runs[0])))
            else:
                rows = torch.cat([torch.arange(a, b) for a, b in runs])
                groups.append((slot, rows if device.type == "cpu" else rows.to(device)))
        return cls(groups, list(spans))


class LoRAContext:
    """The current forward pass's LoRAStep, read by every LinearLoRA of one model (None: no
    row has an adapter, the layers add nothing)."""

    def __init__(self) -> None:
        self.step: LoRAStep | None = None
        # bumped whenever a layer's slot tensors are (re)allocated: the native decoder's C
        # plans hold their addresses and are rebuilt when it changes
        self.generation = 0

    @property
    def active(self) -> bool:
        return self.step is not None


class LinearLoRA:
    """Adapter slots of one linear layer (see the module docstring)."""

    def __init__(self, layer, shard_ids: list, num_slots: int, rank: int,
                 context: LoRAContext, dtype: torch.dtype, device: torch.device):
        self.context = context
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.shard_ids = list(shard_ids)
        # (first output row, rows) of each shard, in order; together they cover the output
        self.spans = [layer.shard_offset(s) for s in self.shard_ids]
        assert sum(n for _, n in self.spans) == self.out_features
        self._spans_c = torch.tensor(self.spans, dtype=torch.long).flatten()  # for the C call
        self._shard_of_col: torch.Tensor | None = None  # for the Triton expand (CUDA)
        self.num_slots, self.rank = num_slots, rank
        k = len(self.shard_ids)
        with torch.inference_mode():
            self.A = torch.zeros(num_slots, k * rank, self.in_features, dtype=dtype,
                                 device=device)
            self.B = torch.zeros(num_slots, rank, self.out_features, dtype=dtype, device=device)
            self.ranks = torch.zeros(num_slots, k, dtype=torch.long)  # on the CPU: C reads it
        self._describe()

    def _describe(self) -> None:
        """The LORA_WORDS words (csrc/decode_abi.h) the C decode loop reads: `desc`, or None
        where C cannot serve these slots."""
        self.context.generation += 1
        abi = native_ops.decode_abi()
        self.desc = None
        if abi is None or self.A.dtype not in _C_KINDS or self.A.device.type != "cpu" \
                or self.in_features % 8:
            return
        words = [0] * abi.LORA_WORDS
        words[abi.LORA_A], words[abi.LORA_B] = self.A.data_ptr(), self.B.data_ptr()
        words[abi.LORA_KIND] = getattr(abi, _C_KINDS[self.A.dtype][1])
        words[abi.LORA_RANK], words[abi.LORA_SHARDS] = self.rank, len(self.spans)
        words[abi.LORA_SPANS] = self._spans_c.data_ptr()
        words[abi.LORA_IN], words[abi.LORA_OUT] = self.in_features, self.out_features
        words[abi.LORA_RANKS] = self.ranks.data_ptr()
        self.desc = torch.tensor(words, dtype=torch.int64)

    def shard_index(self, shard_id) -> int:
        return self.shard_ids.index(shard_id)

    @torch.inference_mode()  # slots are inference tensors: change them only there
    def set_shard(self, slot: int, shard_id, a: torch.Tensor | None, b: torch.Tensor | None
                  ) -> None:
        """Put one shard's factors (a [r, in], b [out_shard, r] with scaling folded in) in a
        slot, or zeros when the adapter does not target it (a is None)."""
        j = self.shard_index(shard_id)
        R, (off, rows) = self.rank, self.spans[j]
        self.A[slot, j * R:(j + 1) * R].zero_()
        self.B[slot, :, off:off + rows].zero_()
        self.ranks[slot, j] = 0
        if a is None:
            return
        r = a.shape[0]
        if r > R or tuple(a.shape) != (r, self.in_features) or tuple(b.shape) != (rows, r):
            raise ValueError(f"LoRA factors {tuple(a.shape)} / {tuple(b.shape)} do not fit a "
                             f"slot of rank {R} for a {rows} x {self.in_features} shard")
        self.A[slot, j * R:j * R + r] = a.to(self.A.dtype)
        self.B[slot, :r, off:off + rows] = b.T.to(self.B.dtype)
        self.ranks[slot, j] = r

    @torch.inference_mode()  # slots are inference tensors: change them only there
    def clear_slot(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.ranks[slot] = 0

    @torch.inference_mode()  # slots are inference tensors: change them only there
    def grow(self, rank: int) -> None:
        """Make every slot rank `rank` (>= the current), keeping the adapters in them."""
        R = self.rank
        if rank <= R:
            return
        k = len(self.shard_ids)
        A = self.A.new_zeros(self.num_slots, k * rank, self.in_features)
        B = self.B.new_zeros(self.num_slots, rank, self.out_features)
        for j in range(k):
            A[:, j * rank:j * rank + R] = self.A[:, j * R:(j + 1) * R]
        B[:, :R] = self.B
        self.A, self.B, self.rank = A, B, rank
        self._describe()

    def add_rows(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """add_to for the native decoder's buffers (x [T, in], y [T, out] fp32 CPU views, rows
        contiguous): one C call (layers/csrc/cpu_ops.c lora_rows_f32) for all rows, where it
        serves (up to MAX_C_ROWS rows); else add_to. A decode step has ~120 of these: torch's
        ~6 ops each cost more than the arithmetic of a few rows."""
        step = self.context.step
        if step is None:
            return
        # desc exists exactly where C can read these slots (see _describe)
        too_many = x.shape[0] > MAX_C_ROWS and not multi_row.is_row_invariant()
        if (self.desc is None or too_many or x.dtype != torch.float32
                or y.dtype != torch.float32 or x.device.type != "cpu"
                or not x.is_contiguous() or y.stride(1) != 1):
            self.add_to(x, y)
            return
        slots = step.row_slots()
        assert slots.numel() == x.shape[0] == y.shape[0]
        fn = getattr(native_ops.lib(), _C_KINDS[self.A.dtype][0])
        fn(x.data_ptr(), x.shape[0], self.in_features, slots.data_ptr(), self.A.data_ptr(),
           self.B.data_ptr(), self.rank, len(self.spans), self.ranks.data_ptr(),
           self._spans_c.data_ptr(), y.data_ptr(), y.stride(0), self.out_features)

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] (the base output of x [T, in]) plus each row's adapter term, in place."""
        step = self.context.step
        if step is None:
            return y
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        A, B = self.A, self.B
        if y2.is_cuda and lora_triton.available():  # one shrink + one expand for the batch
            if self._shard_of_col is None or self._shard_of_col.device != y2.device:
                self._shard_of_col = lora_triton.output_shards(self.spans, self.out_features,
                                                               y2.device)
            lora_triton.lora_add(x2, y2, A, B, step.row_slots_on(y2.device),
                                 self._shard_of_col, self.rank)
            return y
        if y2.dtype != x2.dtype:
            x2 = x2.to(y2.dtype)
        R = self.rank
        for slot, rows in step.groups:
            a, b = A[slot], B[slot]
            if a.dtype != y2.dtype:  # e.g. bf16 factors (lora_dtype): widened per adapter used
                a, b = a.to(y2.dtype), b.to(y2.dtype)
            if isinstance(rows, slice):  # contiguous rows: expand straight into y's rows
                shrunk = x2[rows] @ a.T  # [n, shards * R]
                ys = y2[rows]
                for j, (off, n) in enumerate(self.spans):
                    ys[:, off:off + n].addmm_(shrunk[:, j * R:(j + 1) * R], b[:, off:off + n])
                continue
            shrunk = x2.index_select(0, rows) @ a.T
            if len(self.spans) == 1:
                delta = shrunk @ b  # [n, out]
            else:
                delta = torch.cat([shrunk[:, j * R:(j + 1) * R] @ b[:, off:off + n]
                                   for j, (off, n) in enumerate(self.spans)], dim=1)
            y2.index_add_(0, rows, delta)
        return y

"""An int4 layer as calibration and checkpoint readers produce it: the interchange form of
`int4.py`, plus an optional input-channel permutation (GPTQ act-order).

With act-order, GPTQ walks the input channels by decreasing Hessian diagonal and forms its groups
in that order, so a group is G channels scattered over the input. Sorting the weight's columns
in walk order makes every group contiguous again — the interchange form — and the layer then
computes W[:, perm] @ x[perm]: one gather of the activations before the same int4 kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from turbollm.layers.quant_method import QuantMethod


@dataclass
class Int4Weights:
    qweight: torch.Tensor  # uint8 [out, in], columns in `perm` order when perm is set
    scales: torch.Tensor  # float32 [out, in // G]
    zeros: torch.Tensor  # float32 [out, in // G]
    group_size: int
    perm: torch.Tensor | None = None  # int64 [in]: column j of qweight is input channel perm[j]

    def dequantize(self) -> torch.Tensor:
        """Dense float32 [out, in] in the layer's own input order (the test reference)."""
        # Own formula rather than int4.dequantize_int4: checkpoints may hold group sizes the
        # kernels do not take (those layers stay dense), and they still need dequantizing.
        cols = torch.arange(self.qweight.shape[1], device=self.qweight.device) // self.group_size
        w = (self.qweight.float() - self.zeros.float()[:, cols]) * self.scales.float()[:, cols]
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def rows(self, start: int, count: int) -> "Int4Weights":
        """The weights of output rows [start, start + count) (one shard of a fused layer)."""
        return Int4Weights(self.qweight[start:start + count], self.scales[start:start + count],
                           self.zeros[start:start + count], self.group_size, self.perm)


class PermutedInputMethod(QuantMethod):
    """Gathers the input channels into the weight's column order, then runs the int4 method."""

    def __init__(self, inner, perm: torch.Tensor):
        self.inner = inner
        self.perm = perm
        self.name = f"{inner.name}+act_order"

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.inner.apply(layer, x.index_select(-1, self.perm))

    def row_kernel(self, layer, M: int):
        return None  # the input gather is a torch op: only `apply` serves this layer

    def canonical(self, layer):
        return self.inner.canonical(layer)

    def weight_bytes(self, layer) -> int:
        return self.inner.weight_bytes(layer) + self.perm.numel() * self.perm.element_size()


def install_int4_weights(layer, w: Int4Weights) -> None:
    """Put `w` on a LinearBase: the int4 kernel, behind a gather when there is a permutation."""
    from turbollm.quantization.int4 import install_int4
    device = layer.weight.device  # read before install_int4 drops the dense weight
    install_int4(layer, w.qweight, w.scales, w.zeros, w.group_size)
    if w.perm is not None:
        layer.quant_method = PermutedInputMethod(layer.quant_method, w.perm.to(device))


def layer_int4_weights(layer) -> Int4Weights:
    """The installed int4 weights of a layer, back in the interchange form."""
    qm = layer.quant_method
    if not hasattr(qm, "canonical"):
        raise ValueError(f"layer is not int4-quantized (quant method {qm.name!r})")
    q, s, z = qm.canonical(layer)
    inner = getattr(qm, "inner", qm)
    return Int4Weights(q, s, z, inner.group_size, getattr(qm, "perm", None))


def model_group_size(in_widths, requested: int) -> int:
    """The group size used for a whole model: `requested` when every input width is a multiple
    of it, else the largest multiple of 32 below it that divides them all (SmolLM2's 576-wide
    inputs at 128 -> 96), so one group size holds for the model as checkpoint formats expect and
    groups stay kernel-friendly; falls back to any common divisor."""
    widths = set(in_widths)
    candidates = [g for g in range(requested, 0, -1) if all(w % g == 0 for w in widths)]
    if not candidates:
        raise ValueError(f"no group size <= {requested} divides input widths {sorted(widths)}")
    if candidates[0] != requested:
        aligned = [g for g in candidates if g % 32 == 0]
        return aligned[0] if aligned else candidates[0]
    return requested

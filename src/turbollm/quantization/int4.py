"""Group-wise asymmetric int4 weights: the interchange form and the linear method that serves it.

Contract (stable; RTN, AWQ, GPTQ and GGUF Q4_0/Q4_1 all hand weights over in this form):

    qweight: uint8   [out, in]        values 0..15
    scales:  float32 [out, in // G]
    zeros:   float32 [out, in // G]   zero point in quantized units (may be fractional)
    G:       group size, in % G == 0

    w[o, i] = (qweight[o, i] - zeros[o, i // G]) * scales[o, i // G]

- `quantize_int4_rtn(weight, G)` -> (qweight, scales, zeros): round-to-nearest, integer zeros.
- `dequantize_int4(qweight, scales, zeros, G)` -> float32 weight (the test reference).
- `install_int4(layer, qweight, scales, zeros, G)` swaps a LinearBase's dense weight for the
  packed form; afterwards `layer(x)` runs a low-bit kernel (bias kept).
"""
from __future__ import annotations

import torch
from torch import nn

from turbollm.quantization import kernels


def quantize_int4_rtn(weight: torch.Tensor, group_size: int):
    """Round-to-nearest asymmetric int4 per group of `group_size` input columns."""
    out_f, in_f = weight.shape
    _check_groups(in_f, group_size)
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo = w.amin(-1).clamp(max=0.0)  # include 0 so that zero weights stay exactly representable
    hi = w.amax(-1).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).clamp(min=1e-10)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(out_f, in_f), scales, zeros


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """w = (q - zero) * scale, as float32 [out, in] (the reference for kernels)."""
    out_f, in_f = qweight.shape
    _check_groups(in_f, group_size)
    q = qweight.float().reshape(out_f, in_f // group_size, group_size)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(out_f, in_f)


def _check_groups(in_f: int, group_size: int) -> None:
    if group_size <= 0 or in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group size {group_size}")


class Int4LinearMethod:
    """Serves y = x W^T + b from group-wise int4 weights through `kernels.int4_linear`."""

    name = "int4"

    def __init__(self, group_size: int):
        self.group_size = group_size

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = kernels.int4_linear(x.reshape(-1, shape[-1]), layer.int4_state)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    def canonical(self, layer):
        """(qweight, scales, zeros) back in the interchange form (for writing checkpoints)."""
        return kernels.int4_unpack(layer.int4_state)

    def weight_bytes(self, layer) -> int:
        return kernels.state_bytes(layer.int4_state)


def install_int4(layer, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> None:
    """Replace `layer`'s dense weight by int4 (interchange form above) served by a kernel."""
    out_f, in_f = layer.out_features, layer.in_features
    if tuple(qweight.shape) != (out_f, in_f):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} != layer ({out_f}, {in_f})")
    _check_groups(in_f, group_size)
    for t, name in ((scales, "scales"), (zeros, "zeros")):
        if tuple(t.shape) != (out_f, in_f // group_size):
            raise ValueError(f"{name} shape {tuple(t.shape)} != ({out_f}, {in_f // group_size})")
    if int(qweight.max()) > 15 or int(qweight.min()) < 0:
        raise ValueError("qweight values must lie in 0..15")
    _drop_dense_weight(layer)
    layer.int4_state = kernels.int4_pack(qweight, scales.float(), zeros.float(), group_size)
    layer.quant_method = Int4LinearMethod(group_size)


def _drop_dense_weight(layer) -> None:
    """Free the dense weight; the bias stays a parameter (kept in the layer's dtype)."""
    if isinstance(getattr(layer, "weight", None), nn.Parameter):
        del layer.weight
    layer.weight = None

"""Weight-only int8, per-output-channel symmetric: the interchange form and its linear method.

Contract:
    qweight: int8    [out, in]   values -127..127
    scales:  float32 [out]
    w[o, i] = qweight[o, i] * scales[o]

- `quantize_int8(weight)` -> (qweight, scales)
- `dequantize_int8(qweight, scales)` -> float32 weight (the test reference)
- `install_int8(layer, qweight, scales)` swaps a LinearBase's dense weight for int8 served by a
  low-bit kernel (bias kept).
"""
from __future__ import annotations

import torch

from turbollm.layers.quant_method import QuantMethod
from turbollm.quantization import kernels
from turbollm.quantization.int4 import _drop_dense_weight, layer_device
from turbollm.quantization.registry import register


def quantize_int8(weight: torch.Tensor):
    """Symmetric per-row int8: scale = max|w_row| / 127."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]


@register
class Int8LinearMethod(QuantMethod):
    """Serves y = x W^T + b from per-channel int8 weights through `kernels.int8_linear`."""

    name = "int8"

    @classmethod
    def create_weights(cls, layer, group_size: int) -> None:
        """Per-channel int8 of the dense weight (group_size does not apply)."""
        install_int8(layer, *quantize_int8(layer.weight))

    @classmethod
    def load(cls, layer, qweight, scales, group_size: int | None = None) -> None:
        install_int8(layer, qweight, scales, group_size)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = kernels.int8_linear(x.reshape(-1, shape[-1]), layer.int8_state)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    def row_kernel(self, layer, M: int):
        """The C call `apply` makes for M fp32 rows (bias excluded), or None."""
        return kernels.int8_row_kernel(layer.int8_state, M, layer.in_features)

    def canonical(self, layer):
        """(qweight, scales) in the interchange form."""
        return kernels.int8_unpack(layer.int8_state)

    def weight_bytes(self, layer) -> int:
        return kernels.state_bytes(layer.int8_state)


def install_int8(layer, qweight: torch.Tensor, scales: torch.Tensor,
                 group_size: int | None = None) -> None:
    """Replace `layer`'s dense weight by int8 served by a kernel.

    scales: [out] (per channel) or, with `group_size`, [out, in // group_size] (GGUF Q8_0).
    """
    out_f, in_f = layer.out_features, layer.in_features
    if tuple(qweight.shape) != (out_f, in_f) or qweight.dtype != torch.int8:
        raise ValueError(f"qweight must be int8 ({out_f}, {in_f}), got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    g = group_size or in_f
    if in_f % g or scales.numel() != out_f * (in_f // g):
        raise ValueError(f"scales shape {tuple(scales.shape)} does not fit {out_f} rows with "
                         f"group size {g}")
    device = layer_device(layer)
    _drop_dense_weight(layer)
    layer.int8_state = kernels.state_to(kernels.int8_pack(qweight, scales, g), device)
    layer.quant_method = Int8LinearMethod()

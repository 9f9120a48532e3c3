"""Group-wise asymmetric int4 weights: the interchange form and the linear method that serves it.

Contract (stable; RTN, AWQ, GPTQ and GGUF Q4_0/Q4_1 all hand weights over in this form):

    qweight: uint8   [out, in]        values 0..15
    scales:  float32 [out, in // G]
    zeros:   float32 [out, in // G]   zero point in quantized units (may be fractional)
    G:       group size, a multiple of 32; in % 32 == 0. If G does not divide `in`, the last
             group is shorter and scales/zeros have ceil(in / G) columns (576 = 4*128 + 64).

    w[o, i] = (qweight[o, i] - zeros[o, i // G]) * scales[o, i // G]

The kernels store scales and zeros as float16 (like AWQ, GPTQ and GGUF do), so values that are
not float16-representable are rounded once at install (RTN below returns fp16-exact scales).

- `quantize_int4_rtn(weight, G)` -> (qweight, scales, zeros): round-to-nearest, integer zeros.
- `dequantize_int4(qweight, scales, zeros, G)` -> float32 weight (the test reference).
- `install_int4(layer, qweight, scales, zeros, G)` swaps a LinearBase's dense weight for the
  packed form; afterwards `layer(x)` runs a low-bit kernel (bias kept).
"""
from __future__ import annotations

import torch
from torch import nn

from turbollm.layers.quant_method import QuantMethod
from turbollm.quantization import kernels
from turbollm.quantization.registry import register


def quantize_int4_rtn(weight: torch.Tensor, group_size: int):
    """Round-to-nearest asymmetric int4 per group of `group_size` input columns."""
    out_f, in_f = weight.shape
    ng = _num_groups(in_f, group_size)
    w = weight.detach().float()
    if ng * group_size != in_f:  # a shorter last group: zero padding leaves its range unchanged
        w = torch.nn.functional.pad(w, (0, ng * group_size - in_f))
    w = w.reshape(out_f, ng, group_size)
    lo = w.amin(-1).clamp(max=0.0)  # include 0 so that zero weights stay exactly representable
    hi = w.amax(-1).clamp(min=0.0)
    # float16-representable scales: the kernels store them in fp16, so the round trip is exact
    scales = ((hi - lo) / 15.0).clamp(min=1e-6).half().float()
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(out_f, -1)[:, :in_f].contiguous(), scales, zeros


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """w = (q - zero) * scale, as float32 [out, in] (the reference for kernels)."""
    in_f = qweight.shape[1]
    _num_groups(in_f, group_size)
    cols = torch.arange(in_f) // group_size  # group of each input column
    return (qweight.float() - zeros.float()[:, cols]) * scales.float()[:, cols]


def _num_groups(in_f: int, group_size: int) -> int:
    """Groups per row; the last one may be shorter (e.g. 576 columns in groups of 128)."""
    if group_size <= 0 or group_size % 32 or in_f % 32:
        raise ValueError(f"int4 needs a group size that is a multiple of 32 and in_features a "
                         f"multiple of 32, got group size {group_size}, in_features {in_f}")
    return -(-in_f // group_size)


@register
class Int4LinearMethod(QuantMethod):
    """Serves y = x W^T + b from group-wise int4 weights through `kernels.int4_linear`."""

    name = "int4"

    def __init__(self, group_size: int):
        self.group_size = group_size

    @classmethod
    def create_weights(cls, layer, group_size: int) -> None:
        """Round-to-nearest int4 of the dense weight in groups of `group_size` columns."""
        install_int4(layer, *quantize_int4_rtn(layer.weight, group_size), group_size)

    @classmethod
    def load(cls, layer, qweight, scales, zeros, group_size: int) -> None:
        install_int4(layer, qweight, scales, zeros, group_size)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = kernels.int4_linear(x.reshape(-1, shape[-1]), layer.int4_state)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    def row_kernel(self, layer, M: int):
        """The C call `apply` makes for M fp32 rows (bias excluded), or None."""
        return kernels.int4_row_kernel(layer.int4_state, M, layer.in_features)

    def canonical(self, layer):
        """(qweight, scales, zeros) back in the interchange form (for writing checkpoints)."""
        return kernels.int4_unpack(layer.int4_state)

    def weight_bytes(self, layer) -> int:
        return kernels.state_bytes(layer.int4_state)


def install_int4(layer, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> None:
    """Replace `layer`'s dense weight by int4 (interchange form above) served by a kernel."""
    _check_install(layer, qweight, scales, zeros, group_size)
    install_int4_state(layer, kernels.int4_pack(qweight, scales, zeros, group_size))


def install_int4_minform(layer, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                         group_size: int) -> None:
    """Same, from w = q * scale + min (GGUF Q4_1's form: exact even where a scale is 0)."""
    _check_install(layer, qweight, scales, mins, group_size)
    install_int4_state(layer, kernels.int4_pack_minform(qweight, scales, mins, group_size))


def install_int4_state(layer, state: "kernels.Int4State") -> None:
    device = layer_device(layer)
    _drop_dense_weight(layer)
    layer.int4_state = kernels.state_to(state, device)
    layer.quant_method = Int4LinearMethod(state.group_size)


def _check_install(layer, qweight, scales, zeros, group_size) -> None:
    out_f, in_f = layer.out_features, layer.in_features
    if tuple(qweight.shape) != (out_f, in_f):
        raise ValueError(f"qweight shape {tuple(qweight.shape)} != layer ({out_f}, {in_f})")
    ng = _num_groups(in_f, group_size)
    for t, name in ((scales, "scales"), (zeros, "zeros")):
        if tuple(t.shape) != (out_f, ng):
            raise ValueError(f"{name} shape {tuple(t.shape)} != ({out_f}, {ng})")
    if int(qweight.max()) > 15 or int(qweight.min()) < 0:
        raise ValueError("qweight values must lie in 0..15")


def layer_device(layer) -> torch.device:
    """Where the layer computes (its dense weight's or, once quantized, its state's device)."""
    for t in (getattr(layer, "weight", None), getattr(layer, "bias", None)):
        if t is not None:
            return t.device
    for name in ("int4_state", "int8_state", "fp8_state"):
        if hasattr(layer, name):
            return next(v for v in vars(getattr(layer, name)).values()
                        if isinstance(v, torch.Tensor)).device
    return torch.device("cpu")


def _drop_dense_weight(layer) -> None:
    """Free the dense weight; the bias stays a parameter (kept in the layer's dtype)."""
    if isinstance(getattr(layer, "weight", None), nn.Parameter):
        del layer.weight
    layer.weight = None

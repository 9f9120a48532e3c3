"""fp8 (e4m3) weights, per output channel symmetric: the format of Hopper-class GPUs.

Contract:
    qweight: float8_e4m3fn [out, in]
    scales:  float32 [out]          scale = max |w_row| / 448 (e4m3's largest finite value)
    w[o, i] = qweight[o, i] * scales[o]

Three kernels, chosen per call by `fp8_kernel` (not by the user):
- "triton" on CUDA devices with fp8 support below gpu_kernels.WIDEN_FROM_ROWS rows (decode,
  batched decode): our Triton kernels (gpu_kernels.bytes_linear, shared with int8) read the
  e4m3 bytes and widen them in registers; x stays as it is. On an H100 they ran 1.6-2.1x
  cuBLAS bf16 at one row, where rounding x to fp8 for _scaled_mm cost more than the product.
- "scaled_mm" on CUDA devices with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper):
  each activation row is rounded to e4m3 with its own scale max |x_row| / 448 ("dynamic per
  token") and torch._scaled_mm multiplies the two fp8 matrices, applying both scale vectors to
  the fp32 accumulator. Weights cross memory at 1 byte and the matmul runs at fp8 rate.
- "weight_only" everywhere else (older GPUs, CPU): the weight is widened to x's dtype and x stays
  as it is. On CPU our C GEMM widens fp8 in registers (layers/csrc/cpu_ops.c e4m3_gemm_f32).
  int8 has the same bytes per weight and integer kernels, so on CPU it stays the faster choice.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from turbollm.layers import native_ops
from turbollm.layers.quant_method import QuantMethod
from turbollm.quantization import kernels
from turbollm.quantization.int4 import _drop_dense_weight, layer_device
from turbollm.quantization.registry import register

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass
class Fp8State:
    qweight: torch.Tensor  # float8_e4m3fn [out, in]
    scales: torch.Tensor   # float32 [out]
    fallback: dict = field(default_factory=dict)


def quantize_fp8(weight: torch.Tensor):
    """Per-row e4m3: scale = max |w_row| / 448, values rounded to nearest (saturating)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scales


def dequantize_fp8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scales.float()[:, None]


def quantize_rows_fp8(x: torch.Tensor):
    """Activations [M, K] -> (e4m3 [M, K], fp32 scales [M, 1]): one scale per row (token)."""
    xf = x.float()
    scales = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def fp8_tensor_cores(device: torch.device) -> bool:
    """True on CUDA devices whose tensor cores multiply fp8 (compute capability >= 8.9)."""
    return device.type == "cuda" and _cuda_fp8(device.index)


@functools.cache
def _cuda_fp8(index: int | None) -> bool:  # asked once per device, not per linear call
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_kernel(x: torch.Tensor, state: Fp8State) -> str:
    """Which kernel serves x [M, K] (see the module docstring)."""
    n, k = state.qweight.shape
    if not fp8_tensor_cores(x.device):
        return "weight_only"
    from turbollm.quantization import gpu_kernels
    if gpu_kernels.available() and x.shape[0] < gpu_kernels.WIDEN_FROM_ROWS:
        return "triton"
    if k % 16 == 0 and n % 16 == 0:
        return "scaled_mm"
    return "weight_only"


def fp8_scaled_linear(x: torch.Tensor, state: Fp8State) -> torch.Tensor:
    """fp8 x fp8 with per-token and per-channel scales (torch._scaled_mm; runs on CPU too)."""
    xq, xs = quantize_rows_fp8(x)
    if "scale_row" not in state.fallback:
        state.fallback["scale_row"] = state.scales.float().reshape(1, -1).contiguous()
    y = torch._scaled_mm(xq, state.qweight.t(), scale_a=xs, scale_b=state.fallback["scale_row"],
                         out_dtype=torch.bfloat16)
    return y.to(x.dtype)


def _dequant_rows(state: Fp8State, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    return torch.mul(state.qweight[r0:r1].float(), state.scales[r0:r1, None], out=out)


def fp8_weight_only_linear(x: torch.Tensor, state: Fp8State) -> torch.Tensor:
    """x times the weight widened to x's dtype. On CPU our C GEMM widens it in registers from
    one byte per value (torch converts fp8 one value at a time: ~0.4 s per token of the 135M
    model); without the C library, chunks widened by torch."""
    y = native_ops.e4m3_linear(x, state.qweight, state.scales)
    if y is not None:
        return y.to(x.dtype)
    if x.device.type == "cpu":
        return kernels._widened_linear(x, state.qweight.shape[0],
                                       lambda r0, r1, out: _dequant_rows(state, r0, r1, out))
    w = (state.qweight.to(x.dtype) * state.scales.to(x.dtype)[:, None])
    return F.linear(x, w)


def fp8_linear(x: torch.Tensor, state: Fp8State) -> torch.Tensor:
    kernel = fp8_kernel(x, state)
    if kernel == "triton":
        from turbollm.quantization import gpu_kernels
        return gpu_kernels.bytes_linear(x, state.qweight, state.scales, state.qweight.shape[1])
    if kernel == "scaled_mm":
        return fp8_scaled_linear(x, state)
    return fp8_weight_only_linear(x, state)


@register
class Fp8LinearMethod(QuantMethod):
    """Serves y = x W^T + b from per-channel fp8 weights through `fp8_linear`."""

    name = "fp8"

    @classmethod
    def create_weights(cls, layer, group_size: int) -> None:
        """Per-channel e4m3 of the dense weight (group_size does not apply)."""
        install_fp8(layer, *quantize_fp8(layer.weight))

    @classmethod
    def load(cls, layer, qweight, scales) -> None:
        install_fp8(layer, qweight, scales)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = fp8_linear(x.reshape(-1, shape[-1]), layer.fp8_state)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    def row_kernel(self, layer, M: int):
        """The C call `apply` makes for M fp32 rows on CPU (bias excluded), or None."""
        return native_ops.e4m3_row_kernel(layer.fp8_state.qweight, layer.fp8_state.scales, M)

    def canonical(self, layer):
        return layer.fp8_state.qweight, layer.fp8_state.scales

    def weight_bytes(self, layer) -> int:
        return kernels.state_bytes(layer.fp8_state)


def install_fp8(layer, qweight: torch.Tensor, scales: torch.Tensor) -> None:
    """Replace `layer`'s dense weight by per-channel fp8 (bias kept)."""
    out_f, in_f = layer.out_features, layer.in_features
    if tuple(qweight.shape) != (out_f, in_f) or qweight.dtype != FP8:
        raise ValueError(f"qweight must be float8_e4m3fn ({out_f}, {in_f}), got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    if scales.numel() != out_f:
        raise ValueError(f"fp8 needs one scale per output row ({out_f}), got {scales.numel()}")
    device = layer_device(layer)
    _drop_dense_weight(layer)
    layer.fp8_state = kernels.state_to(Fp8State(qweight.contiguous(),
                                                 scales.float().reshape(-1).contiguous()), device)
    layer.quant_method = Fp8LinearMethod()

"""Linear layers with HF-shard weight loaders and a quantization hook.

Every projection in a model is one of these, so quantization and pruning can replace how a
layer computes (`quant_method`, a layers/quant_method.QuantMethod) and LoRA adds to what it
computes (`lora`, a layers/lora.LinearLoRA) without touching the model file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turbollm.layers import native_ops
from turbollm.layers.prefill_gemm import prefill_gemm
from turbollm.layers.quant_method import QuantMethod


class UnquantizedLinearMethod(QuantMethod):
    """Plain dense weights: y = x W^T + b.

    Up to native_ops.MAX_DENSE_ROWS fp32 activation rows run our C kernel
    (layers/native_ops.py), with fp32 weights or with bf16 / fp16 weights widened to fp32 in
    registers (16-bit storage on a CPU without 16-bit math): torch's few-row GEMV reads weights
    at half the memory bandwidth, and for more rows torch must first widen the whole weight.
    Larger inputs (prefill) use torch, upcasting 16-bit weights, because bf16 matmuls fall back
    to a slow scalar kernel on such CPUs.
    """

    name = "none"

    def apply(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        w, b = layer.weight, layer.bias
        if native_ops.dense_linear_usable(x, w):
            y = native_ops.dense_linear(x, w)
            return y if b is None else y + b.to(x.dtype)
        if w.dtype == x.dtype:
            return F.linear(x, w, b)
        if b is not None:
            b = b.to(x.dtype)
        if x.numel() == x.shape[-1]:  # one row: y = (x in bf16) W^T, accumulated in fp32
            y = F.linear(x.to(w.dtype), w).to(x.dtype)
            return y if b is None else y + b
        if x.dtype == torch.float32:  # 16-bit weights, prefill-sized: fp32 or AMX bf16 tiles
            shape = x.shape
            y = prefill_gemm(x.reshape(-1, shape[-1]), w).reshape(*shape[:-1], w.shape[0])
            return y if b is None else y + b
        return F.linear(x, w.to(x.dtype), b)

    def row_kernel(self, layer: "LinearBase", M: int):
        """The C call `apply` makes for M fp32 rows (bias excluded), or None."""
        return native_ops.dense_row_kernel(layer.weight, M)

    def canonical(self, layer: "LinearBase") -> torch.Tensor:
        return layer.weight

    def weight_bytes(self, layer: "LinearBase") -> int:
        return layer.weight.numel() * layer.weight.element_size()


class LinearBase(nn.Module):
    """y = x W^T (+ b) with W: [out_features, in_features], as in HF checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype,
                                               device=device), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                     requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.quant_method = UnquantizedLinearMethod()
        # adapter slots (layers/lora.py), set by the worker when an adapter targets this layer
        self.lora = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x)
        # the low-rank term goes on the output, so it works over any quant method
        return y if self.lora is None else self.lora.add_to(x, y)

    def shard_offset(self, shard_id) -> tuple[int, int]:
        """(row offset, rows) of a fused shard in this layer's output dimension."""
        return 0, self.out_features

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """Copy one checkpoint tensor (or one shard of a fused layer) into place."""
        offset, rows = self.shard_offset(shard_id)
        target = param.data.narrow(0, offset, rows)
        if target.shape != loaded.shape:
            raise ValueError(f"shape mismatch for shard {shard_id!r}: checkpoint "
                             f"{tuple(loaded.shape)} vs parameter {tuple(target.shape)}")
        target.copy_(loaded)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"quant={self.quant_method.name}")


class ReplicatedLinear(LinearBase):
    """A single projection (o_proj, down_proj, lm_head)."""


class QKVLinear(LinearBase):
    """q, k and v projections fused into one matmul: output = [q | k | v]."""

    def __init__(self, hidden_size: int, q_size: int, kv_size: int, bias: bool = False, **kw):
        super().__init__(hidden_size, q_size + 2 * kv_size, bias, **kw)
        self.q_size, self.kv_size = q_size, kv_size

    def shard_offset(self, shard_id) -> tuple[int, int]:
        return {"q": (0, self.q_size),
                "k": (self.q_size, self.kv_size),
                "v": (self.q_size + self.kv_size, self.kv_size)}[shard_id]


class MergedLinear(LinearBase):
    """Several projections of the same input fused (gate_proj and up_proj): output = [s0 | s1]."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, **kw):
        super().__init__(in_features, sum(out_sizes), bias, **kw)
        self.out_sizes = out_sizes

    def shard_offset(self, shard_id) -> tuple[int, int]:
        return sum(self.out_sizes[:shard_id]), self.out_sizes[shard_id]

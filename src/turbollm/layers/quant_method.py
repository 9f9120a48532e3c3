"""QuantMethod: how a linear layer computes from the weights it stores (the hook of every
LinearBase). One method = one subclass in quantization/ (int8, int4, fp8, ...) registered by
name, plus this package's dense default; the model file never changes.

The three steps (vLLM's QuantizeMethodBase, in our words):
- `create_weights(layer, group_size)`: quantize the layer's dense weight in place (a method
  chosen at load, e.g. `--quantization int8`);
- `load(layer, *interchange)`: install weights that arrive already quantized, in the method's
  interchange form (a checkpoint reader: GGUF, AWQ/GPTQ, our own layout);
- `apply(layer, x)`: y = x W^T (+ b).
A method may also give the C call it makes for M fp32 rows (`row_kernel`, for the native
decode step), its weights in the interchange form (`canonical`, for checkpoint writers), and
their bytes (`weight_bytes`).
"""
from __future__ import annotations

import torch


class QuantMethod:
    """The interface (see the module docstring)."""

    name = "base"

    @classmethod
    def create_weights(cls, layer, group_size: int) -> None:
        raise NotImplementedError(f"{cls.name} does not quantize dense weights at load")

    @classmethod
    def load(cls, layer, *interchange) -> None:
        raise NotImplementedError(f"{cls.name} takes no pre-quantized weights")

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def row_kernel(self, layer, M: int):
        """The C call `apply` makes for M fp32 rows (bias excluded), or None."""
        return None

    def canonical(self, layer):
        """The weights in the method's interchange form."""
        raise NotImplementedError(f"{self.name} has no interchange form")

    def weight_bytes(self, layer) -> int:
        raise NotImplementedError

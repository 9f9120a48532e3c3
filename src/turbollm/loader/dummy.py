"""Random weights of any config's shapes, for benchmarks of real model sizes without downloads."""
from __future__ import annotations

import torch
from torch import nn


def init_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    """Small uniform values (finite in fp16/bf16); norm weights stay 1 so activations stay sane.
    Drawn on the parameters' device (a 7B model's 6.7e9 values take ~40 s through the CPU), so
    the same seed gives other values on a GPU than on the CPU."""
    gens: dict = {}
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        dev = param.device
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev).manual_seed(seed)
        gen = gens[dev]
        values = torch.empty(param.shape, dtype=torch.float32, device=dev)
        param.data.copy_(values.uniform_(low, high, generator=gen).to(param.dtype))

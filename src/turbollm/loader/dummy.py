"""Random weights of any config's shapes, for benchmarks of real model sizes without downloads."""
from __future__ import annotations

import torch
from torch import nn


def init_dummy_weights(model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3) -> None:
    """Small uniform values (finite in fp16/bf16); norm weights stay 1 so activations stay sane."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        cpu = torch.empty(param.shape, dtype=torch.float32).uniform_(low, high, generator=gen)
        param.data.copy_(cpu.to(param.dtype))

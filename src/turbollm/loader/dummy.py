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


def dummy_checkpoint(arch, dtype: torch.dtype, seed: int = 0, low: float = -1e-3,
                     high: float = 1e-3):
    """(hf_name, tensor) pairs of a whole random checkpoint, drawn in the order and with the
    values `init_dummy_weights` gives a single-process model of this arch (CPU generator), one
    tensor at a time, so that a tensor-parallel rank can slice each as it would a file's."""
    from turbollm.models.registry import get_model_class
    with torch.device("meta"):
        ref = get_model_class(arch)(arch, None, max_position=1, dtype=torch.float32,
                                    device="meta", weight_dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, param in ref.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            yield name, torch.ones(param.shape, dtype=dtype)
            continue
        values = torch.empty(param.shape, dtype=torch.float32).uniform_(low, high, generator=gen)
        values = values.to(dtype)
        piece = next((p for p in fused if f".{p}." in name), None)
        if piece is None:
            yield name, values
            continue
        # split the fused draw back into the checkpoint's tensors, as the model fuses them
        layer = getattr(ref.get_submodule(name.rsplit(".", 1)[0]), "shard_offset")
        shards = ("q", "k", "v") if piece == "qkv_proj" else (0, 1)
        for part, shard in zip(fused[piece], shards):
            off, rows = layer(shard)
            yield name.replace(f".{piece}.", f".{part}."), values[off:off + rows]

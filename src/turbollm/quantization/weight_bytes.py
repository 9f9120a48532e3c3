"""Bytes a loaded model's weights occupy, by part, whatever format each layer is served in."""
from __future__ import annotations

from torch import nn

from turbollm.layers.linear import LinearBase


def linear_weight_bytes(layer: LinearBase) -> int:
    """Bytes of one linear layer's weight (packed values + scales), bias excluded."""
    return layer.quant_method.weight_bytes(layer)


def model_weight_bytes(model: nn.Module) -> dict[str, int]:
    """{'linear': decoder linears, 'lm_head', 'embedding', 'other': norms/biases, 'total',
    'linear_bf16': the decoder linears' bytes in bf16, for ratios}. A head tied to the embedding
    and served from it counts 0."""
    out = {"linear": 0, "lm_head": 0, "embedding": 0, "other": 0, "linear_bf16": 0}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            w = module.weight
            if w is not None and id(w) in seen:
                continue  # tied to an already counted table
            if w is not None:
                seen.add(id(w))
            key = "lm_head" if name.endswith("lm_head") else "linear"
            out[key] += linear_weight_bytes(module)
            if key == "linear":
                out["linear_bf16"] += module.in_features * module.out_features * 2
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = "embedding" if "embed_tokens" in name else "other"
        out[key] += p.numel() * p.element_size()
    out["total"] = out["linear"] + out["lm_head"] + out["embedding"] + out["other"]
    return out

"""Quantization chosen at load: which method a checkpoint gets, and RTN int8/int4 of a model.

Which method (ModelConfig.quantization):
- unset: the checkpoint's own — a GGUF file serves its Q8_0/Q4_0/Q4_1 linears natively, a
  quantized HF directory its layout (turbollm int8/int4, AutoAWQ, GPTQ), anything else dense;
- "gguf": the same for a GGUF file (an error for other checkpoints);
- "none": dense weights (a GGUF file is dequantized);
- "int8" / "int4": round-to-nearest quantization of the dense weights at load, any checkpoint;
- "fp8": per-channel e4m3 weights at load (quantization/fp8.py; the fast path needs an Ada or
  Hopper GPU);
- "awq" / "gptq": calibrated (quantization/awq.py, gptq.py), applied by the engine.

lm_head: int8 per channel under int8 and int4 (it is a fifth of SmolLM2's weights and int4 there
costs more quality than anywhere else), dense under fp8 (as vLLM serves fp8 checkpoints); a tied
embedding keeps its dense table for lookups.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from turbollm.layers.linear import LinearBase
from turbollm.quantization.methods import get_method

log = logging.getLogger(__name__)


def quantized_linears(model: nn.Module) -> list[tuple[str, LinearBase]]:
    """(name, layer) of every linear layer of the model, lm_head last."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearBase)]


# the built-in methods that quantize dense weights at load (create_weights), and what lm_head
# gets under each (None: it stays dense; a method not listed quantizes lm_head as the rest)
LAYER_METHODS = ("int8", "int4", "fp8")
HEAD_METHODS: dict[str, str | None] = {"int8": "int8", "int4": "int8", "fp8": None}


def model_group_size(model: nn.Module, requested: int) -> int:
    """One group size for every layer (checkpoint layouts and AWQ/GPTQ use one): the requested
    one when it divides all input widths, else the largest multiple of 32 below it that does."""
    from turbollm.quantization.int4_result import model_group_size as common
    widths = [m.in_features for _, m in quantized_linears(model)]
    g = common(widths, requested)
    if g != requested:
        log.warning("int4 group size %d does not divide the input widths; using %d", requested, g)
    return g


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, group_size: int = 128,
                   progress: bool = True) -> None:
    """Round-to-nearest `method` (int8/int4/fp8) of every dense linear, in place, with a progress
    bar over decoder layers; lm_head as HEAD_METHODS says (see the module docstring)."""
    if method == "int4":
        group_size = model_group_size(model, group_size)
    layers = [(n, m) for n, m in quantized_linears(model) if m.weight is not None]
    from tqdm import tqdm
    by_block: dict[str, list[LinearBase]] = {}
    for name, layer in layers:
        block = name.split(".mlp.")[0].split(".self_attn.")[0]  # model.layers.3 / lm_head
        by_block.setdefault(block, []).append(layer)
    body, head = get_method(method), HEAD_METHODS.get(method, method)
    head = None if head is None else get_method(head)
    for block, mods in tqdm(by_block.items(), desc=f"quantizing ({method})", unit="layer",
                            disable=not progress, leave=False):
        for layer in mods:
            if block.endswith("lm_head"):
                if head is not None:
                    head.create_weights(layer, group_size)
            else:
                body.create_weights(layer, group_size)


def resolve_method(requested: str | None, source_kind: str) -> str | None:
    """The quantization the loader applies (None: whatever the checkpoint holds, served dense
    unless it is natively quantized)."""
    if requested == "gguf" and source_kind != "gguf":
        raise ValueError("quantization 'gguf' needs a GGUF checkpoint")
    if requested is None and source_kind == "gguf":
        return "gguf"
    return requested

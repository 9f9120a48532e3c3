"""Pre-quantized fp8 Hugging Face checkpoints (quantization_config quant_method "fp8", the layout
AutoFP8 writes and vLLM serves), read into the fp8 linear method (`fp8.py`).

Per quantized linear `<m>`:
    <m>.weight        float8_e4m3fn [out, in]
    <m>.weight_scale  float32 scalar (per tensor) or [out] / [out, 1] (per output channel)
    <m>.input_scale   float32 scalar, only with activation_scheme "static"
    w = weight * weight_scale

A per-tensor scale becomes the same per-row scale on every row, so fused layers (qkv, gate_up)
whose shards were quantized with different scales are exact. Activations are rounded per token
at run time ("dynamic"); a static checkpoint's input_scale is not used (per-token scales are at
least as fine), which is logged. Block-wise scales (`weight_block_size`, DeepSeek-V3 style) have
no per-row form and are refused with a clear error.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from turbollm.quantization.fp8 import FP8, install_fp8

log = logging.getLogger(__name__)


def fp8_checkpoint_config(model_dir) -> dict | None:
    """{"activation_scheme": ..., "ignored_layers": [...]} for an fp8 checkpoint directory, else
    None."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        return None
    raw = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    if str(raw.get("quant_method", "")).lower() != "fp8":
        return None
    if raw.get("weight_block_size"):
        raise ValueError("fp8 checkpoint with block-wise scales (weight_block_size "
                         f"{raw['weight_block_size']}): only per-tensor and per-channel scales "
                         "are supported")
    fmt = str(raw.get("fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "float8_e4m3fn"):
        raise ValueError(f"fp8 checkpoint in format {fmt!r}: only e4m3 is supported")
    return {"activation_scheme": str(raw.get("activation_scheme", "dynamic")).lower(),
            "ignored_layers": list(raw.get("ignored_layers", []))}


def load_fp8_checkpoint(model: torch.nn.Module, model_dir, dtype: torch.dtype, fcfg: dict) -> None:
    """Fill `model` from an fp8 checkpoint: dense tensors as usual; each fp8 linear is handed
    over dequantized (so every parameter loads), then switched to its fp8 bytes."""
    from turbollm.loader.safetensors import cast_floats, iter_safetensors_raw

    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # hf prefix -> (q, row scales)

    def tensors():
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in iter_safetensors_raw(model_dir):
            prefix, _, suffix = name.rpartition(".")
            if suffix == "input_scale":
                continue  # dynamic per-token activation scales serve instead
            if suffix in ("weight", "weight_scale") and (
                    t.dtype == FP8 or suffix == "weight_scale"):
                parts = pending.setdefault(prefix, {})
                parts[suffix] = t
                if len(parts) == 2:
                    yield finish(prefix, pending.pop(prefix))
                continue
            yield name, cast_floats(t, dtype)
        for prefix, parts in pending.items():
            raise ValueError(f"{prefix}: fp8 tensors without their pair: {sorted(parts)}")

    def finish(prefix, parts):
        q, scale = parts["weight"], parts["weight_scale"].float()
        rows = q.shape[0]
        if scale.numel() == 1:
            scale = scale.reshape(1).expand(rows)
        elif scale.numel() != rows:
            raise ValueError(f"{prefix}.weight_scale has {scale.numel()} values for {rows} rows: "
                             "only per-tensor and per-channel scales are supported")
        scale = scale.reshape(rows).contiguous()
        quantized[prefix] = (q, scale)
        return f"{prefix}.weight", (q.float() * scale[:, None]).to(dtype)

    if fcfg["activation_scheme"] == "static":
        log.info("fp8 checkpoint with static input scales: activations are scaled per token "
                 "instead")
    model.load_weights(tensors())
    _install(model, quantized)
    model.checkpoint_quantization = "fp8"


def _install(model: torch.nn.Module, quantized: dict) -> None:
    """fp8 on each linear whose shards all came in fp8 (shards concatenated in row order)."""
    from turbollm.loader.awq_gptq import linear_shards, shard_order

    for name, layer, shards in linear_shards(model, quantized, "fp8"):
        order = shard_order(layer, shards)
        if order is None:
            log.warning("%s: only some shards are fp8; kept dense", name)
            continue
        install_fp8(layer, torch.cat([shards[s][0] for s in order]),
                    torch.cat([shards[s][1] for s in order]))

"""turbollm's own int8 / int4 checkpoint layout (written by `turbollm quantize`), and its reader.

A Hugging Face directory: config.json, model.safetensors, tokenizer files. config.json carries

    "quantization_config": {"quant_method": "turbollm", "bits": 8 | 4, "group_size": G | null,
                            "lm_head_bits": 8 | null, "format_version": 1}

Every quantized linear `<m>` (HF names, unfused: q_proj, k_proj, ..., lm_head) is stored as
  bits 8:  <m>.qweight int8 [out, in];  <m>.scales float32 [out] (per channel)
           or [out, in / G'] (per group of G' = in / columns, e.g. 32 from GGUF Q8_0)
           w = qweight * scale
  bits 4:  <m>.qweight uint8 [out, in / 2]: byte j holds column 2j (low nibble) and 2j + 1
           (high nibble); <m>.scales, <m>.zeros float16 [out, ceil(in / G)]
           w = (q - zero) * scale, the interchange form of int4.py
(the lm_head is int8 under both). Biases, norms, embeddings: `<name>` in the model's storage
dtype. A tied lm_head keeps tie_word_embeddings: its int8 copy is an extra `lm_head.*` entry.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from turbollm.layers.linear import LinearBase

log = logging.getLogger(__name__)

METHOD = "turbollm"
_SUFFIXES = ("qweight", "scales", "zeros")


def _pieces(name: str, layer: LinearBase) -> list[tuple[str, int, int]]:
    """(HF module name, first row, rows) of each checkpoint piece of a (fused) layer."""
    from turbollm.models.llama import FUSED_SHARDS
    base, _, fused = name.rpartition(".")
    pieces = [(f"{base}.{piece}", *layer.shard_offset(sid))
              for piece, (f, sid) in FUSED_SHARDS.items() if f == fused]
    return pieces or [(name, 0, layer.out_features)]


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def _unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of `model` in this layout, and the facts for its quantization_config."""
    state: dict[str, torch.Tensor] = {}
    bits, groups, head_bits = set(), set(), None
    linear_params = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        method = layer.quant_method.name
        if layer.weight is not None:
            linear_params.add(id(layer.weight))
        if method not in ("none", "int8", "int4"):
            raise ValueError(f"{name}: cannot write quant method {method!r} in this layout")
        if method == "int8":
            q, s = layer.quant_method.canonical(layer)
        elif method == "int4":
            q, s, z = layer.quant_method.canonical(layer)
            groups.add(layer.quant_method.group_size)
        if name.endswith("lm_head"):
            head_bits = 8 if method == "int8" else None
            if method == "int4":
                raise ValueError("an int4 lm_head has no place in this layout")
        elif method != "none":
            bits.add(8 if method == "int8" else 4)
        # a dense head tied to the embedding is written once, as the embedding
        tied = method == "none" and any(layer.weight is m.weight for m in model.modules()
                                        if isinstance(m, nn.Embedding))
        for piece, r0, rows in _pieces(name, layer):
            rs = slice(r0, r0 + rows)
            if method == "int8":
                state[f"{piece}.qweight"] = q[rs]
                state[f"{piece}.scales"] = s[rs].float()
            elif method == "int4":
                state[f"{piece}.qweight"] = _pack_nibbles(q[rs])
                state[f"{piece}.scales"] = s[rs].half()
                state[f"{piece}.zeros"] = z[rs].half()
            elif not tied:
                state[f"{piece}.weight"] = layer.weight[rs]
            if layer.bias is not None:
                state[f"{piece}.bias"] = layer.bias[rs]
    for name, p in model.named_parameters():
        if isinstance(model.get_submodule(name.rpartition(".")[0]), LinearBase):
            continue
        state[name] = p.detach()
    if len(bits) != 1 or len(groups) > 1:
        raise ValueError(f"the model must have one quantized format (got bits {sorted(bits)}, "
                         f"group sizes {sorted(groups)})")
    facts = {"quant_method": METHOD, "bits": bits.pop(),
             "group_size": groups.pop() if groups else None, "lm_head_bits": head_bits,
             "format_version": 1}
    return {k: v.contiguous().clone() for k, v in state.items()}, facts


def write_checkpoint(model: nn.Module, hf_config: dict, out_dir, tokenizer=None,
                     storage_dtype: torch.dtype | None = None) -> Path:
    """Write model.safetensors + config.json (+ tokenizer files) to `out_dir`."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, facts = checkpoint_tensors(model)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config["quantization_config"] = facts
    if storage_dtype is not None:
        config["torch_dtype"] = str(storage_dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def checkpoint_config(model_dir) -> dict | None:
    """The quantization_config of a checkpoint in this layout, else None."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    qcfg = json.loads(path.read_text()).get("quantization_config") or {}
    return qcfg if qcfg.get("quant_method") == METHOD else None


def load_checkpoint(model: nn.Module, model_dir, dtype: torch.dtype, qcfg: dict) -> None:
    """Fill `model` from this layout: dense tensors as usual, each quantized linear first as its
    dequantized weight (so every parameter loads), then switched to the packed form."""
    from turbollm.loader.safetensors import cast_floats, iter_safetensors_raw
    parts: dict[str, dict[str, torch.Tensor]] = {}
    dense: list[tuple[str, torch.Tensor]] = []
    for name, t in iter_safetensors_raw(model_dir):
        prefix, _, suffix = name.rpartition(".")
        if suffix in _SUFFIXES:
            parts.setdefault(prefix, {})[suffix] = t
        else:
            dense.append((name, cast_floats(t, dtype)))
    canonical = {prefix: _canonical(p, qcfg) for prefix, p in parts.items()}
    dense += [(f"{prefix}.weight", _dequantize(c).to(dtype)) for prefix, c in canonical.items()]
    model.load_weights(dense)
    _install(model, canonical)


def _canonical(p: dict[str, torch.Tensor], qcfg: dict) -> tuple:
    if "zeros" in p:  # int4
        return ("int4", _unpack_nibbles(p["qweight"]), p["scales"].float(), p["zeros"].float(),
                int(qcfg["group_size"]))
    s = p["scales"].float()
    return ("int8", p["qweight"], s, None, p["qweight"].shape[1] // (s.shape[1] if s.dim() == 2
                                                                    else 1))


def _dequantize(c) -> torch.Tensor:
    kind, q, s, z, g = c
    if kind == "int4":
        from turbollm.quantization.int4 import dequantize_int4
        return dequantize_int4(q, s, z, g)
    s2 = s if s.dim() == 2 else s[:, None]
    return (q.float().reshape(q.shape[0], s2.shape[1], -1) * s2[..., None]).reshape(q.shape)


def _install(model: nn.Module, canonical: dict) -> None:
    from turbollm.quantization.int4 import install_int4
    from turbollm.quantization.int8 import install_int8
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        pieces = [canonical.get(piece) for piece, _, _ in _pieces(name, layer)]
        if not all(pieces):
            continue
        kind, g = pieces[0][0], pieces[0][4]
        if any(p[0] != kind or p[4] != g for p in pieces):
            raise ValueError(f"{name}: its pieces are stored in different formats")
        cat = [torch.cat([p[i] for p in pieces]) if pieces[0][i] is not None else None
               for i in (1, 2, 3)]
        if kind == "int4":
            install_int4(layer, cat[0], cat[1], cat[2], g)
        else:
            s = cat[1]
            install_int8(layer, cat[0], s, group_size=None if s.dim() == 1 else g)

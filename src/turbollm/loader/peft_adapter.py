"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors), read with our
own code: serving never imports `peft`.

What PEFT writes for a Llama model (adapter name stripped from the keys):
    base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight   [out, r]
and y = W x + scaling * B A x with scaling = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)).
We fold the scaling into B once here, so the model adds (x A^T) B^T and nothing else.

Anything we would serve wrongly is refused with a one-line error naming the file: DoRA, bias
terms, modules_to_save (whole replaced modules), embedding or lm_head adapters, per-module
alpha/rank patterns, modules the model does not have, and shapes that do not fit the model.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from turbollm.loader.errors import CheckpointError
from turbollm.model_arch import ModelArch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The projections an adapter may target, by their HF names (the model fuses q/k/v and gate/up,
# layers/lora.py puts each in its shard)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(\w+)\.lora_([AB])\.weight$")


@dataclass
class PeftAdapter:
    """One adapter's weights, ready to copy into the model's slots."""

    path: str
    rank: int  # the largest rank of its modules (the slot rank it needs)
    scaling: float  # lora_alpha / r (or / sqrt(r) for rsLoRA), already folded into B
    # (layer index, HF module name) -> (A [r, in], B [out, r] * scaling), fp32
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def target_modules(self) -> set[str]:
        return {m for _, m in self.weights}

    def num_bytes(self) -> int:
        return sum(a.numel() * 4 + b.numel() * 4 for a, b in self.weights.values())


def module_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """HF module name -> (in_features, out_features) of that projection in `arch`."""
    h, inter = arch.hidden_size, arch.intermediate_size
    return {"q_proj": (h, arch.q_size), "k_proj": (h, arch.kv_size), "v_proj": (h, arch.kv_size),
            "o_proj": (arch.q_size, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json of a PEFT directory, checked for what we can serve."""
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(path, "not a directory (a PEFT adapter is a directory with "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    if not cfg_file.is_file():
        raise CheckpointError(cfg_file, "missing: not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(cfg_file, f"unreadable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(cfg_file, "not a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise CheckpointError(cfg_file, f"peft_type {kind!r} is not supported (only LORA)")
    refusals = {
        "use_dora": "DoRA adapters (use_dora) are not supported",
        "modules_to_save": "modules_to_save (fully replaced modules) is not supported",
        "rank_pattern": "per-module ranks (rank_pattern) are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
        "lora_bias": "LoRA bias terms (lora_bias) are not supported",
        "use_qalora": "QA-LoRA adapters (use_qalora) are not supported",
    }
    for key, why in refusals.items():
        if cfg.get(key):
            raise CheckpointError(cfg_file, why)
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(cfg_file, f"bias={cfg['bias']!r} is not supported (only 'none')")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1:
        raise CheckpointError(cfg_file, f"r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(cfg_file, f"lora_alpha must be a number, got {alpha!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # a string is a regex over module names: the keys decide
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown:
            raise CheckpointError(cfg_file, f"target_modules {unknown} are not supported "
                                            f"(only {', '.join(TARGETS)})")
    return cfg


def load_peft_adapter(path: str | Path, arch: ModelArch | None = None) -> PeftAdapter:
    """Read a PEFT LoRA directory; with `arch`, check every tensor fits that model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    cfg = read_adapter_config(path)
    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        other = " (adapter_model.bin found: re-save with safe_serialization=True)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise CheckpointError(wfile, f"missing{other}")
    try:
        tensors = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(wfile, f"unreadable safetensors ({exc})") from None
    r = cfg["r"]
    scaling = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            what = "embedding adapters are" if "lora_embedding" in key else f"tensor {key!r} is"
            raise CheckpointError(wfile, f"{what} not supported (LoRA on "
                                         f"{', '.join(TARGETS)} only)")
        layer, _, module, half = m.groups()
        if module not in TARGETS:
            raise CheckpointError(wfile, f"tensor {key!r}: module {module!r} is not supported")
        halves.setdefault((int(layer), module), {})[half] = t
    if not halves:
        raise CheckpointError(wfile, "holds no LoRA tensors")
    shapes = module_shapes(arch) if arch is not None else None
    weights = {}
    rank = 0
    for (layer, module), pair in sorted(halves.items()):
        where = f"layers.{layer}.{module}"
        if set(pair) != {"A", "B"}:
            raise CheckpointError(wfile, f"{where} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"].float(), pair["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(wfile, f"{where}: lora_A {tuple(a.shape)} and lora_B "
                                         f"{tuple(b.shape)} do not make a low-rank pair")
        if a.shape[0] != r:
            raise CheckpointError(wfile, f"{where} has rank {a.shape[0]} but r = {r}")
        if shapes is not None:
            if layer >= arch.num_hidden_layers:
                raise CheckpointError(wfile, f"{where}: the model has "
                                             f"{arch.num_hidden_layers} layers")
            d_in, d_out = shapes[module]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise CheckpointError(
                    wfile, f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                           f"fit the model's {module} ({d_out} x {d_in}); another base model?")
        weights[(layer, module)] = (a.contiguous(), (b * scaling).contiguous())
        rank = max(rank, a.shape[0])
    return PeftAdapter(str(path), rank, scaling, weights)

"""LoRA adapters to train on a transformers model (distillation into an adapter), saved in
PEFT's format so that `--lora-modules` serves them and PEFT itself loads them.

y = W x + (alpha / r) * B A x with W frozen, A [r, in] random (Kaiming-uniform, as PEFT) and
B [out, r] zero, so training starts from the base model exactly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from turbollm.loader.peft_adapter import CONFIG_FILE, TARGETS, WEIGHTS_FILE


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def add_lora(net: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = TARGETS
             ) -> dict[str, LoRALinear]:
    """Freeze `net` and put a LoRALinear on every decoder projection named in `targets`;
    {module path: adapter}."""
    for p in net.parameters():
        p.requires_grad_(False)
    added = {}
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear) and ".layers." in \
                    f".{name}.":
                lora = LoRALinear(child, rank, alpha)
                setattr(module, child_name, lora)
                added[f"{name}.{child_name}"] = lora
    if not added:
        raise ValueError(f"no module named {targets} to adapt")
    return added


def save_peft(adapters: dict[str, LoRALinear], rank: int, alpha: float, base_model: str,
              out_dir) -> Path:
    """adapter_config.json + adapter_model.safetensors, as PEFT writes them."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, lora in adapters.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = lora.lora_A.detach().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = lora.lora_B.detach().contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    targets = sorted({p.rsplit(".", 1)[1] for p in adapters})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": 0.0, "bias": "none", "target_modules": targets,
              "base_model_name_or_path": base_model, "fan_in_fan_out": False,
              "inference_mode": True, "use_rslora": False, "use_dora": False}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out

"""LoRA rows of the benchmark: a random PEFT adapter for the model under test, and an LLM view
whose every generate runs with it (so the measurement code stays the same for every row)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(out: Path, arch, rank: int, seed: int) -> None:
    """A PEFT LoRA directory (A, B ~ N(0, 0.02) on all seven targets) for a Llama-shaped model
    of this arch, written without peft."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    h, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.q_size, arch.kv_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    tensors = {}
    for i in range(arch.num_hidden_layers):
        for name, (d_in, d_out) in shapes.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            stem = f"base_model.model.model.layers.{i}.{part}.{name}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * 0.02
            tensors[f"{stem}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False}))


class WithAdapter:
    """`llm` with `lora_request` passed to every generate (other attributes pass through)."""

    def __init__(self, llm, lora_request):
        self._llm, self._lora = llm, lora_request

    def generate(self, *args, **kwargs):
        return self._llm.generate(*args, lora_request=self._lora, **kwargs)

    def __getattr__(self, name):
        return getattr(self._llm, name)


def with_random_adapter(llm, rank: int, directory: Path):
    """Write a rank-`rank` adapter into `directory`, load it, and return llm's adapter view."""
    from turbollm import LoRARequest
    write_adapter(directory, llm.engine.arch, rank, seed=0)
    req = LoRARequest("bench", 1, str(directory))
    llm.engine.add_lora(req)
    return WithAdapter(llm, req)

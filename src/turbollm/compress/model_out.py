"""Writing a model the compress tools produced: an HF safetensors directory (model.safetensors,
config.json, tokenizer files) that `LLM(dir)`, `turbollm serve` and HF transformers load."""
from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def output_dtype(requested: str, hf_config: dict) -> str:
    """auto: the source checkpoint's own dtype, float32 where it has none (GGUF)."""
    if requested == "auto":
        requested = str(hf_config.get("torch_dtype") or hf_config.get("dtype")
                        or "float32").replace("torch.", "")
    if requested not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {requested!r}")
    return requested


def write_model_dir(out_dir, tensors: dict[str, torch.Tensor], hf_config: dict, tokenizer,
                    dtype: str, quantization_config: dict | None = None) -> Path:
    """Save `tensors` (floats cast to `dtype`; already-compressed parts as they are) with
    hf_config (its own quantization_config replaced by `quantization_config`, or dropped)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = DTYPES[dtype]
    state = {name: (t.to(target) if t.is_floating_point() else t).contiguous()
             for name, t in tensors.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in hf_config.items()
              if k not in ("quantization_config", "compression_config")}
    config["torch_dtype"] = dtype
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out

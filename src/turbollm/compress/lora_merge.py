"""`turbollm lora merge BASE ADAPTER OUT`: fold a LoRA adapter into its base model's weights and
write an HF safetensors model (for deployments that serve one adapter only).

Each targeted projection becomes W + scaling * B A, computed in fp32 from the base checkpoint's
weights as the loader reads them (a GGUF base is dequantized), then stored in the output dtype.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_adapter(base: str, adapter: str, out_dir, dtype: str = "auto") -> Path:
    """Write base + adapter, merged, to `out_dir` (model.safetensors, config.json, tokenizer).
    dtype auto: the base checkpoint's own, or float32 where it has none (GGUF)."""
    from safetensors.torch import save_file

    from turbollm.loader.peft_adapter import load_peft_adapter
    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.model_loader import iter_checkpoint, load_tokenizer_for, read_arch
    source = resolve_model(base, "auto")
    if source.kind == "preset":
        raise ValueError(f"{base!r} is a config preset without weights: nothing to merge into")
    arch, hf_config = read_arch(source)
    lora = load_peft_adapter(adapter, arch)  # checked against the base's shapes
    if dtype == "auto":
        dtype = str(arch.torch_dtype or "float32").replace("torch.", "")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    out_dtype = _DTYPES[dtype]
    tensors, merged = {}, set()
    for name, t in iter_checkpoint(source, torch.float32):
        m = _LINEAR.match(name)
        key = (int(m.group(1)), m.group(2)) if m else None
        if key in lora.weights:
            a, b = lora.weights[key]  # b carries the scaling
            t = t.float() + b @ a
            merged.add(key)
        tensors[name] = t.to(out_dtype).contiguous()
    missing = set(lora.weights) - merged
    if missing:
        raise ValueError(f"{adapter}: the base checkpoint has no weight for "
                         f"{len(missing)} adapted modules, e.g. {sorted(missing)[0]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    tokenizer = load_tokenizer_for(source, None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def add_lora_parser(sub) -> None:
    p = sub.add_parser("lora", help="LoRA adapter tools")
    tools = p.add_subparsers(dest="lora_command", required=True)
    m = tools.add_parser("merge", help="write BASE with ADAPTER folded into its weights as an "
                                       "HF safetensors model directory")
    m.add_argument("base", help="base model: directory, GGUF file, hub id or 'smollm2-135m'")
    m.add_argument("adapter", help="PEFT adapter directory")
    m.add_argument("out", help="directory to write")
    m.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES],
                   help="storage dtype (auto: the base's, float32 for GGUF)")
    m.set_defaults(func=run_merge)


def run_merge(args) -> int:
    out = merge_adapter(args.base, args.adapter, args.out, args.dtype)
    print(f"wrote {out}")
    return 0

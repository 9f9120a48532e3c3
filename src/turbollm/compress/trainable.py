"""Trainable copies of a model for the offline tools that need gradients (distillation):
transformers' modeling code with the weights our loader reads (any format it reads: HF
safetensors, GGUF dequantized), a layer-dropped copy, and saving as an HF directory that
turbollm and transformers both load.

Serving never uses these; they exist because training needs autograd modules, and the
engine's layers are built for inference (packed weights, a paged KV cache).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch


def load_trainable(model: str, dtype: torch.dtype = torch.float32):
    """(transformers causal LM in train-ready fp32, its HF config dict, tokenizer or None)."""
    import transformers

    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.model_loader import iter_checkpoint, load_tokenizer_for, read_arch
    source = resolve_model(model, "auto")
    if source.kind == "preset":
        raise ValueError(f"{model!r} is a config preset without weights")
    _, hf_config = read_arch(source)
    config = transformers.AutoConfig.for_model(**{
        k: v for k, v in hf_config.items() if k != "quantization_config"})
    net = transformers.AutoModelForCausalLM.from_config(config)
    state = dict(iter_checkpoint(source, dtype))
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)
               and "rotary_emb" not in m]
    if missing or unexpected:
        raise ValueError(f"{model}: checkpoint does not fit its config: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    return net.to(dtype), dict(hf_config), load_tokenizer_for(source, None)


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `num_layers`, always the first and the last: the
    embedding-side and output-side layers matter most to a dropped-layer copy."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep must be in [1, {num_layers}], got {keep}")
    if keep == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def drop_layers(net, keep: list[int]):
    """A copy of `net` with only the decoder layers `keep` (in order)."""
    out = copy.deepcopy(net)
    layers = out.model.layers
    out.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(out.model.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx  # transformers keys its KV cache by it
    out.config.num_hidden_layers = len(keep)
    if getattr(out.config, "layer_types", None) is not None:
        out.config.layer_types = [out.config.layer_types[i] for i in keep]
    return out


def save_hf(net, hf_config: dict, tokenizer, out_dir, dtype: str = "float32") -> Path:
    """Write `net` as an HF directory (model.safetensors, config.json, tokenizer files)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tensors = {k: v.detach().to(torch_dtype).contiguous() for k, v in net.state_dict().items()
               if "rotary_emb" not in k}
    if getattr(net.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config.update(num_hidden_layers=net.config.num_hidden_layers, torch_dtype=dtype)
    config.setdefault("architectures", [type(net).__name__])
    config.setdefault("model_type", net.config.model_type)
    if getattr(net.config, "layer_types", None) is not None and "layer_types" in config:
        config["layer_types"] = list(net.config.layer_types)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out

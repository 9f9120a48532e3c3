"""Peer engines for side-by-side measurements: Hugging Face transformers on the same weights."""
from __future__ import annotations

from pathlib import Path

import torch


def hf_state_dict_from_gguf(path: str | Path) -> tuple[dict, object]:
    """(tensors, LlamaConfig) as transformers' own GGUF loader reads the file.

    `from_pretrained(gguf_file=...)` needs `accelerate`; the checkpoint loader only needs a model
    skeleton to map names (it un-permutes q/k from the file's own head counts), so a meta-device
    Llama of the file's config is enough.
    """
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from turbollm.loader.gguf import GGUFCheckpoint
    cfg = {k: v for k, v in GGUFCheckpoint(path).hf_config.items()
           if k not in ("architectures", "model_type", "torch_dtype")}
    config = transformers.LlamaConfig(**cfg)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return state, config


def hf_model_from_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' Llama with the GGUF's weights as read by transformers' own GGUF loader."""
    import transformers
    state, config = hf_state_dict_from_gguf(path)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model.to(dtype).eval()


def hf_model_from_dir(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' model from an HF directory."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()

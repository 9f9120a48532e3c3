"""Which model class runs which HF architecture."""
from __future__ import annotations

from turbollm.model_arch import ModelArch
from turbollm.models.llama import LlamaForCausalLM

_ARCHS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def get_model_class(arch: ModelArch):
    """The model class for an architecture, or a clear error naming what is supported."""
    for name in arch.architectures:
        if name in _ARCHS:
            return _ARCHS[name]
    if arch.is_llama_family:
        return LlamaForCausalLM
    raise ValueError(f"model type {arch.model_type!r} ({', '.join(arch.architectures) or '?'}) "
                     f"is not supported; supported: {', '.join(sorted(_ARCHS))}")

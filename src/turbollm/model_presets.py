"""HF config dicts of well-known models (shapes only, no weights): for `load_format=dummy`
engines and the planner."""
from __future__ import annotations

from typing import Any


def _llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int,
           **extra: Any) -> dict[str, Any]:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "torch_dtype": "float16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    cfg.update(extra)
    return cfg


_LLAMA3 = {"max_position_embeddings": 8192, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
           "bos_token_id": 128000, "eos_token_id": 128001}

PRESETS: dict[str, dict[str, Any]] = {
    "Llama-2-7B": _llama(4096, 11008, 32, 32, 32, 32000),
    "Llama-2-13B": _llama(5120, 13824, 40, 40, 40, 32000),
    "Llama-2-70B": _llama(8192, 28672, 80, 64, 8, 32000),
    "Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, **_LLAMA3),
    "Llama-3-70B": _llama(8192, 28672, 80, 64, 8, 128256, **_LLAMA3),
    "Mistral-7B": _llama(4096, 14336, 32, 32, 8, 32000, architectures=["MistralForCausalLM"],
                         model_type="mistral", max_position_embeddings=32768,
                         sliding_window=4096, torch_dtype="bfloat16"),
    "SmolLM2-135M": _llama(576, 1536, 30, 9, 3, 49152, max_position_embeddings=8192,
                           rope_theta=100000.0, tie_word_embeddings=True,
                           torch_dtype="bfloat16", bos_token_id=0, eos_token_id=0),
    # Falcon: fused QKV, multi-query (7B) or grouped KV (40B, "new decoder architecture"),
    # 2-matrix GELU MLP of 4 x hidden, LayerNorm, tied embeddings.
    "Falcon-7B": {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": 4544,
        "num_attention_heads": 71, "num_hidden_layers": 32, "multi_query": True,
        "new_decoder_architecture": False, "parallel_attn": True, "bias": False,
        "alibi": False, "vocab_size": 65024, "layer_norm_epsilon": 1e-5,
        "torch_dtype": "bfloat16", "bos_token_id": 11, "eos_token_id": 11,
    },
    "Falcon-40B": {
        "architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": 8192,
        "num_attention_heads": 128, "num_kv_heads": 8, "num_hidden_layers": 60,
        "new_decoder_architecture": True, "parallel_attn": True, "bias": False,
        "alibi": False, "vocab_size": 65024, "layer_norm_epsilon": 1e-5,
        "torch_dtype": "bfloat16", "bos_token_id": 11, "eos_token_id": 11,
    },
}


def norm_name(name: str) -> str:
    """A model name reduced for loose matching."""
    # 'meta-llama/Llama-2-70b-hf' -> 'llama270b'; 'mistral-7b-v0.1' -> 'mistral7bv01'
    name = name.rsplit("/", 1)[-1].lower()
    for suffix in ("-hf", "-v0.1", "-instruct", "-chat"):
        name = name.replace(suffix, "")
    return "".join(ch for ch in name if ch.isalnum()).replace("meta", "")


def preset_config(name: str) -> dict[str, Any] | None:
    """The config dict of a preset, matched loosely ('llama-2-70b', 'meta-llama/Llama-2-70b-hf')."""
    key = norm_name(name)
    for preset, cfg in PRESETS.items():
        if norm_name(preset) == key:
            return dict(cfg)
    return None

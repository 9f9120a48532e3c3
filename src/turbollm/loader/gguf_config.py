"""GGUF metadata -> an HF `config.json`-equivalent dict (what `ModelArch.from_hf_config` reads)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# general.architecture -> (HF model_type, HF architectures entry)
SUPPORTED_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),  # also Mistral, SmolLM/SmolLM2, TinyLlama files
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}

# llama.cpp writes Llama-3.1-style scaling only as the `rope_freqs` tensor of per-frequency
# divisors; the pre-scaling context it was computed for is not stored, and is 8192 for every
# Llama 3.x release.
LLAMA3_ORIGINAL_CONTEXT = 8192


def check_architecture(arch: str) -> None:
    """Raise a one-line ValueError for a GGUF architecture we cannot run."""
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}: turbollm loads {sorted(SUPPORTED_ARCHS)} GGUF files"
        )


def _clean_float(v: Any) -> float:
    """GGUF stores float32: 9.999999747e-06 -> 1e-05, the value the HF config had."""
    return float(str(np.float32(v)))


def build_hf_config(
    metadata: dict[str, Any],
    tensor_shapes: dict[str, tuple[int, ...]],
    rope_freqs: np.ndarray | None = None,
) -> dict[str, Any]:
    """HF config dict from GGUF metadata and the tensor table (GGUF names -> row-major shapes)."""
    arch = str(metadata.get("general.architecture", ""))
    check_architecture(arch)
    model_type, hf_arch = SUPPORTED_ARCHS[arch]

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads) or heads)
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // heads)
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size")
    if vocab is None:
        vocab = tensor_shapes["token_embd.weight"][0] if "token_embd.weight" in tensor_shapes else len(tokens or [])
    ffn = get("feed_forward_length")
    if ffn is None:  # old files: read it off the gate projection [intermediate, hidden]
        ffn = tensor_shapes["blk.0.ffn_gate.weight"][0]

    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(vocab),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rms_norm_eps": _clean_float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _clean_float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(get, rope_freqs, head_dim),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": "blk.0.attn_q.bias" in tensor_shapes,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": None,
    }
    if model_type == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def _rope_scaling(get, rope_freqs: np.ndarray | None, head_dim: int) -> dict[str, Any] | None:
    """HF `rope_scaling` from `{arch}.rope.scaling.*` keys, or Llama-3 style from the rope_freqs tensor."""
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor") or get("rope.scale_linear")
    original = get("rope.scaling.original_context_length")
    if kind in (None, "none") and get("rope.scale_linear"):
        kind = "linear"
    if kind in ("linear", "yarn") and factor:
        out: dict[str, Any] = {"rope_type": kind, "factor": _clean_float(factor)}
        if original:
            out["original_max_position_embeddings"] = int(original)
        return out
    if rope_freqs is not None:
        return llama3_rope_scaling(
            rope_freqs, _clean_float(get("rope.freq_base", 10000.0)), head_dim, int(original or LLAMA3_ORIGINAL_CONTEXT)
        )
    return None


def llama3_rope_scaling(rope_freqs: np.ndarray, theta: float, head_dim: int, original: int) -> dict[str, Any]:
    """Recover HF llama3 `rope_scaling` parameters from llama.cpp's per-frequency divisors.

    llama.cpp stores r_i = 1 (high frequencies), `factor` (low ones), and in between
    1 / ((1 - s_i) / factor + s_i) with s_i = (original / wavelen_i - low) / (high - low).
    s_i is linear in 1/wavelen_i, so a line fit through the in-between points gives low and high.
    """
    r = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    factor = float(r.max())
    low, high = 1.0, 4.0  # Llama 3.x defaults, used when too few in-between points are present
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)[: len(r)]
    inv_wavelen = inv_freq / (2 * math.pi)
    mid = (r > 1 + 1e-4) & (r < factor - 1e-4)
    if factor > 1 and mid.sum() >= 2:
        s = (1 / r[mid] - 1 / factor) / (1 - 1 / factor)
        # s = original/(high-low) * inv_wavelen - low/(high-low)
        slope, intercept = np.polyfit(inv_wavelen[mid], s, 1)
        span = original / slope
        low = -intercept * span
        high = low + span
    return {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": round(float(low), 4),
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": original,
    }

"""Write a Llama/Qwen2 HF state dict as a GGUF file the way llama.cpp's converter does (for tests and tools).

Tensor names are mapped to GGUF's, q/k rows are permuted for the `llama` architecture, 1-D
tensors (norms, biases) stay F32, and matrices are stored as `ggml_type` (F32, F16, BF16, Q8_0,
Q4_0, Q4_1; quantized with gguf-py's reference quantizer).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from gguf import GGUFWriter, GGMLQuantizationType as QT, RopeScalingType, TokenType, quants

from turbollm.loader.gguf import rope_permute_index

_LAYER_STEMS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBALS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
WRITABLE_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1)


def hf_to_gguf_name(hf_name: str) -> str:
    """GGUF tensor name of an HF Llama/Qwen2 parameter."""
    if hf_name in _GLOBALS:
        return _GLOBALS[hf_name]
    parts = hf_name.split(".")  # model.layers.{i}.<module path>.{weight|bias}
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:-1]) not in _LAYER_STEMS:
        raise ValueError(f"no GGUF name for parameter {hf_name!r}")
    return f"blk.{parts[2]}.{_LAYER_STEMS['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_llama_gguf(
    path: str | Path,
    hf_config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: Any = None,
    ggml_type: QT = QT.F16,
    overrides: Mapping[str, QT] | None = None,
    tokenizer_pre: str = "default",
) -> Path:
    """Write an HF Llama/Qwen2 state dict as GGUF (+ optional byte-level BPE tokenizer or its dir)."""
    path = Path(path)
    arch = hf_config.get("model_type", "llama")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"write_llama_gguf cannot write model_type {arch!r}")
    arch = "qwen2" if arch == "qwen2" else "llama"
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads

    w = GGUFWriter(str(path), arch)
    w.add_name("turbollm-test")
    w.add_block_count(hf_config["num_hidden_layers"])
    w.add_context_length(hf_config.get("max_position_embeddings", 4096))
    w.add_embedding_length(hf_config["hidden_size"])
    w.add_feed_forward_length(hf_config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(hf_config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(hf_config.get("rms_norm_eps", 1e-6)))
    w.add_rope_dimension_count(head_dim)
    if head_dim * heads != hf_config["hidden_size"]:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(hf_config["vocab_size"])
    _add_rope_scaling(w, hf_config, head_dim)
    if tokenizer is not None:
        _add_tokenizer(w, tokenizer, tokenizer_pre)

    overrides = dict(overrides or {})
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and hf_config.get("tie_word_embeddings"):
            continue
        x = tensor.detach().to(torch.float32).cpu()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            n = heads if ".q_proj." in hf_name else kv_heads
            x = x[rope_permute_index(x.shape[0], n)]
        qtype = overrides.get(hf_name, ggml_type if x.dim() == 2 else QT.F32)
        _add_tensor(w, hf_to_gguf_name(hf_name), x.numpy(), qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tensor(w: GGUFWriter, name: str, x: np.ndarray, qtype: QT) -> None:
    if qtype not in WRITABLE_TYPES:
        raise ValueError(f"cannot write {name} as {qtype.name}; writable: {[t.name for t in WRITABLE_TYPES]}")
    # Every type goes in as raw bytes [.., bytes_per_row]; GGUFWriter derives the element shape.
    raw = np.ascontiguousarray(quants.quantize(x, qtype)).view(np.uint8)
    w.add_tensor(name, raw, raw_dtype=qtype)


def _add_rope_scaling(w: GGUFWriter, cfg: Mapping[str, Any], head_dim: int) -> None:
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(RopeScalingType.LINEAR if kind == "linear" else RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        if "original_max_position_embeddings" in scaling:
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind == "llama3":
        # llama.cpp stores Llama-3.1 scaling as per-frequency divisors in a `rope_freqs` tensor.
        factors = llama3_rope_factors(float(cfg.get("rope_theta", 10000.0)), head_dim, scaling)
        w.add_tensor("rope_freqs.weight", factors)


def llama3_rope_factors(theta: float, head_dim: int, scaling: Mapping[str, Any]) -> np.ndarray:
    """Per-frequency divisors [head_dim/2] (float32) of HF's llama3 rope scaling."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = int(scaling["original_max_position_embeddings"])
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / theta ** (-i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _add_tokenizer(w: GGUFWriter, tokenizer: Any, pre: str) -> None:
    """gpt2-style (byte-level BPE) tokenizer metadata from an HF fast tokenizer or tokenizer directory."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers can be written to GGUF here, not {model.get('type')}")
    vocab = tokenizer.get_vocab()  # includes added tokens
    tokens = [""] * len(vocab)
    for token, idx in vocab.items():
        tokens[idx] = token
    types = [int(TokenType.NORMAL)] * len(tokens)
    for idx, added in tokenizer.added_tokens_decoder.items():
        types[idx] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("unk_token_id", w.add_unk_token_id),
        ("pad_token_id", w.add_pad_token_id),
    ):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)

"""Load a GGUF checkpoint as HF-named tensors: `(hf_name, tensor)` pairs, config and chat template.

llama.cpp's converter renames tensors (`blk.3.attn_q.weight`) and, for the `llama` architecture,
permutes the rows of q_proj/k_proj so that each head's rotary pairs are interleaved
(GGML's "normal" rope) instead of split in halves (HF's rotate_half). We map names back and undo
that permutation, so the weights equal the original HF ones and feed the same model code.
"""
from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from turbollm.loader.gguf_config import build_hf_config, check_architecture
from turbollm.loader.gguf_dequant import dequantize
from turbollm.loader.gguf_file import GGUFFile
from turbollm.loader.lazy_tensor import LazyGGUFTensor

# GGUF per-layer tensor stem -> HF module path inside `model.layers.{i}.`
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that carry no HF parameter (llama3 rope factors are folded into the config).
_SKIPPED = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str | None:
    """HF parameter name of a GGUF tensor (None for tensors with no HF parameter)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name in _SKIPPED:
        return None
    m = _LAYER_RE.match(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected tensor {name!r} in GGUF file")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def rope_unpermute_index(rows: int, n_heads: int) -> torch.Tensor:
    """Row index that undoes llama.cpp's q/k permutation: hf_rows = gguf_rows[index].

    llama.cpp maps HF rows [head, half, i] (half = 0/1: first/second rotary half) to
    GGUF rows [head, i, half]; reading GGUF row (head, i, half) for HF row (head, half, i) undoes it.
    """
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return torch.arange(rows).reshape(n_heads, half, 2).transpose(1, 2).reshape(-1)


def rope_permute_index(rows: int, n_heads: int) -> torch.Tensor:
    """Row index that applies llama.cpp's q/k permutation: gguf_rows = hf_rows[index]."""
    half = rows // n_heads // 2
    return torch.arange(rows).reshape(n_heads, 2, half).transpose(1, 2).reshape(-1)


class GGUFCheckpoint:
    """A memory-mapped GGUF file read as an HF Llama/Qwen2 checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        check_architecture(self.file.architecture)
        # hf_name -> GGUF tensor name, in file order
        self._names: dict[str, str] = {}
        for name in self.file.tensors:
            hf = gguf_to_hf_name(name)
            if hf is not None:
                self._names[hf] = name

    @property
    def metadata(self) -> dict[str, Any]:
        """All GGUF metadata as plain Python values (arrays of numbers as numpy)."""
        return self.file.metadata

    @cached_property
    def hf_config(self) -> dict[str, Any]:
        """HF config.json-equivalent dict built from the metadata."""
        shapes = {name: info.shape for name, info in self.file.tensors.items()}
        rope_freqs = None
        if "rope_freqs.weight" in self.file.tensors:
            info = self.file.tensors["rope_freqs.weight"]
            rope_freqs = dequantize(info.ggml_type, self.file.tensor_bytes(info.name), info.shape).numpy()
        return build_hf_config(self.metadata, shapes, rope_freqs)

    @property
    def chat_template(self) -> str | None:
        """Jinja chat template stored in the file, if any."""
        return self.metadata.get("tokenizer.chat_template")

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence token id from the tokenizer metadata."""
        return self.metadata.get("tokenizer.ggml.bos_token_id")

    @property
    def eos_token_id(self) -> int | None:
        """End-of-sequence token id from the tokenizer metadata."""
        return self.metadata.get("tokenizer.ggml.eos_token_id")

    def hf_names(self) -> list[str]:
        """HF parameter names in the file, in file order."""
        return list(self._names)

    def ggml_type(self, hf_name: str) -> GGMLQuantizationType:
        """Storage type of one parameter (F32, Q4_1, ...)."""
        return self.file.tensors[self._names[hf_name]].ggml_type

    def _unpermute_index(self, hf_name: str, rows: int) -> torch.Tensor | None:
        if self.file.architecture != "llama":
            return None  # qwen2 (and others) store q/k in HF order
        cfg = self.hf_config
        if ".self_attn.q_proj." in hf_name:
            return rope_unpermute_index(rows, cfg["num_attention_heads"])
        if ".self_attn.k_proj." in hf_name:
            return rope_unpermute_index(rows, cfg["num_key_value_heads"])
        return None

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """HF shape of one parameter ([out, in] for a matrix)."""
        return tuple(self.file.tensors[self._names[hf_name]].shape)

    def raw_part(self, hf_name: str, rows: tuple[int, int] | None = None,
                 cols: tuple[int, int] | None = None) -> np.ndarray:
        """Raw bytes uint8 [rows, bytes_per_row] of one parameter in HF row order: HF rows
        [start, stop) (stop past the end: the rows there are) and columns [first, end) (on
        quantization-block boundaries, or end at the row's end), all where None. The file is
        mapped, so only that part is read."""
        info = self.file.tensors[self._names[hf_name]]
        raw = self.file.tensor_bytes(info.name)
        block, block_bytes = GGML_QUANT_SIZES[info.ggml_type]
        if len(info.shape) == 1 and block == 1:
            raw = raw.reshape(info.shape[0], -1)  # 1-D float tensor: one "row" per element
        start, stop = (0, raw.shape[0]) if rows is None else (rows[0], min(rows[1], raw.shape[0]))
        index = self._unpermute_index(hf_name, raw.shape[0])
        # Quantization blocks never cross rows, so permuting raw rows equals permuting values.
        raw = raw[start:stop] if index is None else raw[index.numpy()[start:stop]]
        if cols is not None:
            blocks = raw.reshape(raw.shape[0], -1, block_bytes)
            raw = blocks[:, cols[0] // block:-(-cols[1] // block)].reshape(raw.shape[0], -1)
        return raw

    def raw_tensor(self, hf_name: str) -> tuple[GGMLQuantizationType, np.ndarray, tuple[int, ...]]:
        """(ggml type, raw bytes uint8 [rows, bytes_per_row] in HF row order, HF shape [out, in])."""
        return self.ggml_type(hf_name), self.raw_part(hf_name), self.shape(hf_name)

    def get_tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One parameter dequantized to `dtype`, HF shape and row order."""
        ggml_type, raw, shape = self.raw_tensor(hf_name)
        return dequantize(ggml_type, raw, shape).to(dtype)

    def iter_tensors(self, dtype: torch.dtype = torch.float32, lazy: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hf_name, tensor) for every parameter, dequantized and cast to `dtype`; lazy:
        as LazyGGUFTensors (loader/lazy_tensor.py) that dequantize only what is read."""
        for hf_name in self._names:
            yield hf_name, (LazyGGUFTensor(self, hf_name, dtype) if lazy
                            else self.get_tensor(hf_name, dtype))

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, arch={self.file.architecture!r}, tensors={len(self._names)})"

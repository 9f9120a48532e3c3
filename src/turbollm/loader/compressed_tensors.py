"""Sparse weights in the compressed-tensors formats (as llm-compressor writes them), written by
`turbollm prune` and read back dense at load, from any producer.

config.json carries
    "quantization_config": {"quant_method": "compressed-tensors", "format": "dense",
                            "sparsity_config": {"format": "sparse-bitmask" | "sparse-24-bitmask",
                                                "sparsity_structure": "unstructured" | "2:4" | ...,
                                                "global_sparsity": f, "targets": ["Linear"],
                                                "ignore": ["lm_head"], ...}, ...}
(older llm-compressor releases named the block "compression_config"; both are read).

Every compressed weight `<m>.weight` [rows, cols] is stored as
  sparse-bitmask:     <m>.shape  int64 [2]            the dense shape
                      <m>.compressed  [nnz]           the kept values, row-major, weight dtype
                      <m>.bitmask  uint8 [rows, ceil(cols / 8)]  1 = kept; bit k of byte j is
                                                      column 8j + k (numpy "little" bit order)
                      <m>.row_offsets  int64 [rows]   where each row starts in `compressed`
  sparse-24-bitmask:  <m>.shape  int64 [2, 1], <m>.bitmask as above,
                      <m>.compressed  [rows, cols / 2]  the two kept values of every 4, in order
The mask says which entries are *stored*, not which are nonzero: a kept weight may be 0.

The loader decompresses to dense tensors (the engine's dense kernels then serve them); a sparse
GEMV that reads the compressed form is a later step. Quantized compressed-tensors checkpoints
(config_groups) are refused with a clear error: no reader for them exists here yet.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from turbollm.loader.errors import CheckpointError

BITMASK = "sparse-bitmask"
SPARSE_24 = "sparse-24-bitmask"
SPARSE_FORMATS = (BITMASK, SPARSE_24)
_PARTS = ("shape", "compressed", "bitmask", "row_offsets")
# the compressed-tensors version whose sparse layout this file follows (the sparse compressors
# were dropped from compressed-tensors after 0.14; 0.9-0.14 read and write this layout)
FORMAT_VERSION = "0.9.4"


def _compression_block(config: dict) -> dict | None:
    qc = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "compressed-tensors")).lower()
    if method not in ("compressed-tensors", "compressed_tensors"):
        return None
    if "quant_method" not in qc and "sparsity_config" not in qc:
        return None
    return qc


def sparsity_config(model_dir) -> dict | None:
    """The sparsity_config of a compressed-tensors sparse checkpoint directory, else None
    (dense, another quantization scheme, or no config.json)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        qc = _compression_block(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # read_hf_config reports a broken config.json with its own error
    if qc is None:
        return None
    if qc.get("config_groups"):
        raise ValueError(f"{model_dir}: quantized compressed-tensors checkpoints (config_groups) "
                         f"are not supported yet; only sparse ones "
                         f"({' / '.join(SPARSE_FORMATS)}) with dense values")
    sc = qc.get("sparsity_config") or None
    if sc is None or sc.get("format", "dense") == "dense":
        return None
    if sc["format"] not in SPARSE_FORMATS:
        raise ValueError(f"{model_dir}: compressed-tensors sparsity format {sc['format']!r} is "
                         f"not supported (one of {', '.join(SPARSE_FORMATS)})")
    return sc


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols / 8)], bit k of byte j = column 8j + k."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The inverse of pack_mask: bool [rows, cols]."""
    bits = np.unpackbits(packed.cpu().numpy().view(np.uint8), axis=-1, count=shape[-1],
                         bitorder="little")
    return torch.from_numpy(bits.reshape(shape).astype(bool))


def compress_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-bitmask parts of a 2-D weight ({"shape": ..., ...}); zeros are not stored."""
    mask = weight != 0
    counts = mask.sum(1)
    return {"shape": torch.tensor(list(weight.shape), dtype=torch.int64),
            "compressed": weight[mask].contiguous(),
            "bitmask": pack_mask(mask),
            "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64)}


def compress_24(weight: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """sparse-24-bitmask parts: `mask` (bool, exactly 2 kept in every 4 consecutive columns)
    says what is stored; by default the weight's nonzeros, which must then be at most 2 of 4
    (groups with fewer get their largest zeros stored)."""
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"2:4 needs a column count divisible by 4, got {cols}")
    if mask is None:
        groups = weight.reshape(rows, cols // 4, 4)
        if int((groups != 0).sum(-1).max()) > 2:
            raise ValueError("weight is not 2:4 sparse: a group of 4 has more than 2 nonzeros")
        # top-2 |w| of each group; ties among zeros are harmless (they store a zero)
        keep = groups.abs().float().topk(2, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        mask = mask.reshape(rows, cols)
    elif int(mask.reshape(rows, cols // 4, 4).sum(-1).ne(2).sum()):
        raise ValueError("a 2:4 mask must keep exactly 2 of every 4 columns")
    return {"shape": torch.tensor(list(weight.shape), dtype=torch.int64).reshape(-1, 1),
            "compressed": weight[mask].reshape(rows, cols // 2).contiguous(),
            "bitmask": pack_mask(mask)}


def decompress(parts: dict[str, torch.Tensor], name: str = "?") -> torch.Tensor:
    """Dense weight from its parts (either format: the kept values fill the mask's places in
    row-major order, which is how both store them)."""
    missing = [p for p in ("shape", "compressed", "bitmask") if p not in parts]
    if missing:
        raise ValueError(f"compressed weight {name} lacks {', '.join(missing)}")
    shape = [int(s) for s in parts["shape"].reshape(-1).tolist()]
    mask = unpack_mask(parts["bitmask"], shape)
    values = parts["compressed"].reshape(-1)
    if int(mask.sum()) != values.numel():
        raise ValueError(f"compressed weight {name}: the bitmask keeps {int(mask.sum())} values "
                         f"but {values.numel()} are stored")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def iter_compressed_tensors(model_dir: Path, dtype: torch.dtype
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, dense tensor in dtype) for every tensor of a compressed-tensors sparse
    checkpoint: `<m>.shape/.compressed/.bitmask[/.row_offsets]` become `<m>.weight`, whichever
    shards the parts are in; other tensors pass through."""
    from turbollm.loader.safetensors import cast_floats, iter_safetensors_raw
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in iter_safetensors_raw(model_dir):
        prefix, _, part = name.rpartition(".")
        if part not in _PARTS:
            yield name, cast_floats(t, dtype)
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = t
        needed = ("shape", "compressed", "bitmask")
        if all(p in parts for p in needed):
            # row_offsets is redundant with the mask; it may follow in a later shard
            yield f"{prefix}.weight", cast_floats(decompress(parts, prefix), dtype)
            pending[prefix] = {"done": t}
    incomplete = [p for p, parts in pending.items() if "done" not in parts]
    if incomplete:
        raise CheckpointError(Path(model_dir), f"compressed weight {incomplete[0]} is missing "
                                               f"some of shape/compressed/bitmask")


def sparsity_entry(fmt: str, structure: str, global_sparsity: float) -> dict:
    """The quantization_config block llm-compressor writes for a sparse, unquantized model."""
    if fmt not in SPARSE_FORMATS:
        raise ValueError(f"unknown sparse format {fmt!r}")
    return {"quant_method": "compressed-tensors", "format": "dense", "version": FORMAT_VERSION,
            "quantization_status": "compressed", "config_groups": {},
            "sparsity_config": {"format": fmt, "sparsity_structure": structure,
                                "global_sparsity": round(float(global_sparsity), 6),
                                "targets": ["Linear"], "ignore": ["lm_head"],
                                "registry_requires_subclass": False}}


def compress_state_dict(tensors: dict[str, torch.Tensor], fmt: str, is_target
                        ) -> dict[str, torch.Tensor]:
    """`tensors` with every `<m>.weight` for which is_target(name) holds stored in `fmt`."""
    out = {}
    for name, t in tensors.items():
        if not (name.endswith(".weight") and t.dim() == 2 and is_target(name)):
            out[name] = t
            continue
        prefix = name[:-len(".weight")]
        if fmt == SPARSE_24:
            parts = compress_24(t)
        elif fmt == BITMASK:
            parts = compress_bitmask(t)
        else:
            raise ValueError(f"unknown sparse format {fmt!r}")
        out.update({f"{prefix}.{k}": v for k, v in parts.items()})
    return out

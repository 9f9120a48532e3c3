"""Serve a GGUF file's Q8_0 / Q4_0 / Q4_1 linears in their quantized form.

The model is first filled with the dequantized weights (the exact reference), then every linear
whose checkpoint tensors all have a low-bit kernel is switched to the packed form read from the
raw blocks, bit for bit:
  Q4_1 (d, m, q):  w = q * d + m            -> int4 min form, group 32 (exactly Q4_1)
  Q4_0 (d, q):     w = (q - 8) * d = q*d - 8d -> int4 min form (-8d is exact in fp16)
  Q8_0 (d, q):     w = q * d                -> int8 with one scale per 32 columns
A fused layer (qkv, gate_up) needs one form for all its shards; mixed int4/int8 shards or other
types (Q4_K, Q6_K, F16) stay dense. A tied lm_head is served from the token embedding's blocks.
A tensor-parallel rank takes its rows and its whole 32-column blocks
(layers/parallel_linear.checkpoint_slice): the same blocks, split, and it reads and unpacks only
those from the mapped file.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from turbollm.layers.linear import MergedLinear, QKVLinear
from turbollm.layers.parallel_linear import checkpoint_slice, slice_checkpoint_rows
from turbollm.loader.gguf import GGUFCheckpoint
from turbollm.loader.gguf_dequant import q4_0_unpack, q4_1_unpack, q8_0_unpack
from turbollm.quantization import kernels
from turbollm.quantization.int4 import install_int4_state
from turbollm.quantization.int8 import install_int8

log = logging.getLogger(__name__)

_INT4_TYPES = (QT.Q4_0, QT.Q4_1)


def _shard_names(name: str, layer) -> list[str]:
    """HF checkpoint names of a layer's shards, in output-row order."""
    base = name.rpartition(".")[0]
    if isinstance(layer, QKVLinear):
        return [f"{base}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
    if isinstance(layer, MergedLinear):
        return [f"{base}.{p}.weight" for p in ("gate_proj", "up_proj")]
    return [f"{name}.weight"]


def _int4_minform(ggml_type, raw):
    """(q uint8, scale fp16, min fp16) of Q4_0/Q4_1 rows."""
    if ggml_type == QT.Q4_1:
        return q4_1_unpack(raw)
    q, d = q4_0_unpack(raw)
    return q, d, d * -8.0


def _q8_0(ggml_type, raw):
    """(q int8, scale fp16) of Q8_0 rows."""
    return q8_0_unpack(raw)


def _shard_ids(layer) -> list:
    if isinstance(layer, QKVLinear):
        return ["q", "k", "v"]
    if isinstance(layer, MergedLinear):
        return list(range(len(layer.out_sizes)))
    return [None]


def _rank_arrays(ckpt: GGUFCheckpoint, name: str, layer, shard_id, unpack) -> list[torch.Tensor]:
    """The unpacked arrays (q [rows, cols], then per 32-column group [rows, cols / 32]) of a
    tensor-parallel rank's part of one shard: its rows, and its columns in whole 32-weight
    blocks (a rank's column slice starts and ends on a multiple of 32, checked by the caller),
    read from the mapped file and unpacked alone; rows past the tensor's end (the
    vocab-parallel head's padding) are zeros. The whole tensor for a layer of one process."""
    rows, cols = checkpoint_slice(layer, shard_id)
    raw = ckpt.raw_part(name, None if rows is None else (rows[0], rows[0] + rows[1]),
                        None if cols is None else (cols[0], cols[0] + cols[1]))
    arrays = unpack(ckpt.ggml_type(name), np.ascontiguousarray(raw))
    return [slice_checkpoint_rows(a, None if rows is None else (0, rows[1])).contiguous()
            for a in arrays]


def install_gguf_native(model: nn.Module, ckpt: GGUFCheckpoint) -> dict[str, str]:
    """Switch every linear with a native kernel to its packed GGUF form; {layer: served form}."""
    names = set(ckpt.hf_names())
    served = {}
    for name, layer in model.named_modules():
        if not hasattr(layer, "quant_method") or getattr(layer, "weight", None) is None:
            continue
        shards = _shard_names(name, layer)
        if name == "lm_head" and "lm_head.weight" not in names:
            shards = ["model.embed_tokens.weight"]  # tied head
        if not all(s in names for s in shards):
            continue
        types = {ckpt.ggml_type(s) for s in shards}
        ids = _shard_ids(layer)
        cols = checkpoint_slice(layer, ids[0])[1]
        if cols is not None and cols[0] % 32:
            continue  # a rank's columns would split a 32-column block: stays dense
        if types <= set(_INT4_TYPES) and layer.in_features % 32 == 0:
            parts = [_rank_arrays(ckpt, s, layer, sid, _int4_minform)
                     for s, sid in zip(shards, ids)]
            q, d, m = (torch.cat([p[i] for p in parts]) for i in range(3))
            install_int4_state(layer, kernels.int4_pack_minform(q, d, m, 32))
            served[name] = "+".join(sorted(t.name for t in types))
        elif types == {QT.Q8_0} and layer.in_features % 32 == 0:
            parts = [_rank_arrays(ckpt, s, layer, sid, _q8_0) for s, sid in zip(shards, ids)]
            q = torch.cat([p[0] for p in parts])
            d = torch.cat([p[1] for p in parts]).float()
            install_int8(layer, q, d, group_size=32)
            served[name] = "Q8_0"
    kinds = sorted(set(served.values()))
    log.info("GGUF native: %d linear layers served quantized (%s)", len(served), ", ".join(kinds))
    return served

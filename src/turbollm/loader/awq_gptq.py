"""Pre-quantized Hugging Face checkpoints in the AutoAWQ (GEMM) and GPTQ safetensors layouts:
read them into the int4 interchange form (`int4.py`), and write them (`turbollm quantize
--method awq|gptq`, compress/quantize.py, calibrates a model and writes it here).

Both layouts pack eight 4-bit values into an int32, value i in bits [4i, 4i + 4); tensors are
stored transposed against nn.Linear (input dimension first). Per quantized linear `<m>`:

AutoAWQ GEMM (quantization_config: quant_method "awq", version "gemm", zero_point true)
    <m>.qweight  int32 [in, out / 8]      packed along out, in AWQ's interleaved order: the eight
                                          values of word c are columns 8c + (0, 2, 4, 6, 1, 3, 5, 7)
    <m>.qzeros   int32 [in / G, out / 8]  same packing
    <m>.scales   fp16  [in / G, out]
    w = (q - z) * s

GPTQ (quantization_config: quant_method "gptq"; checkpoint_format "gptq" or "gptq_v2")
    <m>.qweight  int32 [in / 8, out]      packed along in, in order: word r holds rows 8r..8r+7
    <m>.qzeros   int32 [ceil(in / G), out / 8]  packed along out, in order
    <m>.scales   fp16  [ceil(in / G), out]
    <m>.g_idx    int32 [in]               group of each input channel (not monotone with act-order)
    w = (q - z) * s, where the classic "gptq" format stores z - 1 (so z = stored + 1, and a zero
    point of 0 cannot be written) and "gptq_v2" stores z itself.

GPTQ's groups (arbitrary g_idx, a ragged last group) become interchange groups by sorting the
input channels by group (a permutation, applied to the activations: see int4_result.py) and
choosing the largest group size that divides every group boundary.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from turbollm.quantization.int4_result import Int4Weights, install_int4_weights

log = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word nibble i holds column 8c + AWQ_ORDER[i]
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


# ----- nibble packing -----
def pack_int4(values: torch.Tensor, order=None) -> torch.Tensor:
    """[..., 8k] ints 0..15 -> int32 [..., k]; word nibble i = values[..., 8c + order[i]]."""
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, 8)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=v.device)
    word = ((v & 15) << shifts).sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)  # two's complement


def unpack_int4(words: torch.Tensor, order=None) -> torch.Tensor:
    """int32 [..., k] -> uint8 [..., 8k], the inverse of pack_int4."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    v = (words.to(torch.int32)[..., None] >> shifts) & 15  # arithmetic shift; the mask fixes sign
    if order is not None:
        v = v[..., torch.argsort(torch.tensor(order))]
    return v.reshape(*words.shape[:-1], -1).to(torch.uint8)


def _integer_zeros(zeros: torch.Tensor) -> torch.Tensor:
    z = torch.round(zeros)
    if (z - zeros).abs().max() > 1e-3 or z.min() < 0 or z.max() > 15:
        raise ValueError("these int4 weights have fractional or out-of-range zero points; the "
                         "AWQ and GPTQ layouts store integer zero points 0..15")
    return z.to(torch.int64)


# ----- AutoAWQ GEMM -----
def awq_pack(w: Int4Weights) -> dict[str, torch.Tensor]:
    if w.perm is not None:
        raise ValueError("the AWQ layout has no input permutation (act-order): use GPTQ")
    return {"qweight": pack_int4(w.qweight.T, AWQ_ORDER),
            "qzeros": pack_int4(_integer_zeros(w.zeros).T, AWQ_ORDER),
            "scales": w.scales.T.to(torch.float16).contiguous()}


def awq_unpack(t: dict[str, torch.Tensor], group_size: int) -> Int4Weights:
    q = unpack_int4(t["qweight"], AWQ_ORDER).T.contiguous()
    zeros = unpack_int4(t["qzeros"], AWQ_ORDER).T.float().contiguous()
    scales = t["scales"].T.float().contiguous()
    in_f = q.shape[1]
    if in_f % group_size or scales.shape[1] != in_f // group_size:
        raise ValueError(f"AWQ tensors do not fit group size {group_size}: qweight in={in_f}, "
                         f"scales {tuple(t['scales'].shape)}")
    return Int4Weights(q, scales, zeros, group_size)


# ----- GPTQ -----
def gptq_pack(w: Int4Weights, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    out_f, in_f = w.qweight.shape
    G = w.group_size
    col_group = torch.arange(in_f) // G  # group of each interchange column
    if w.perm is None:
        q, g_idx = w.qweight, col_group
    else:
        perm = w.perm.cpu()
        q = torch.empty_like(w.qweight)
        q[:, perm] = w.qweight
        g_idx = torch.empty(in_f, dtype=torch.int64)
        g_idx[perm] = col_group
    z = _integer_zeros(w.zeros).T  # [groups, out]
    if checkpoint_format == "gptq":
        z = z - 1  # the classic format's stored value; -1 would wrap: callers check first
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}")
    return {"qweight": pack_int4(q).T.contiguous(),
            "qzeros": pack_int4(z),
            "scales": w.scales.T.to(torch.float16).contiguous(),
            "g_idx": g_idx.to(torch.int32)}


def gptq_unpack(t: dict[str, torch.Tensor], group_size: int,
                checkpoint_format: str = "gptq") -> Int4Weights:
    q = unpack_int4(t["qweight"].T.contiguous())  # [out, in]
    out_f, in_f = q.shape
    scales = t["scales"].T.float()  # [groups, out] -> [out, groups]
    zeros = unpack_int4(t["qzeros"]).T.float()[:out_f]
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # classic offset; a stored 15 reads as 16, as GPTQ kernels read it
    g_idx = t.get("g_idx")
    g_idx = (torch.arange(in_f) // group_size if g_idx is None else g_idx.to(torch.int64))
    if g_idx.shape != (in_f,) or int(g_idx.max()) >= scales.shape[1]:
        raise ValueError(f"GPTQ g_idx does not fit: {tuple(g_idx.shape)} for in={in_f}, "
                         f"{scales.shape[1]} groups")
    perm = None
    if bool((g_idx[1:] < g_idx[:-1]).any()):
        perm = torch.argsort(g_idx, stable=True)
        q, g_idx = q[:, perm], g_idx[perm]
    # Interchange groups: the largest size dividing every boundary between GPTQ groups.
    bounds = (torch.nonzero(g_idx[1:] != g_idx[:-1]).flatten() + 1).tolist()
    G = math.gcd(in_f, *bounds) if bounds else in_f
    first = g_idx[::G]  # GPTQ group of each interchange group
    return Int4Weights(q.contiguous(), scales[:, first].contiguous(),
                       zeros[:, first].contiguous(), G, perm)


# ----- config -----
def prequantized_config(model_dir) -> dict | None:
    """The normalized quantization config of an AWQ/GPTQ checkpoint directory, else None:
    {"method": "awq"|"gptq", "group_size": G, "format": ...}."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    raw = None
    if cfg_path.is_file():
        raw = json.loads(cfg_path.read_text()).get("quantization_config")
    for side in ("quantize_config.json", "quant_config.json"):  # older AutoGPTQ / AutoAWQ
        if raw is None and (model_dir / side).is_file():
            raw = json.loads((model_dir / side).read_text())
    if not raw:
        return None
    method = str(raw.get("quant_method", "gptq" if "desc_act" in raw else "awq")).lower()
    if method not in ("awq", "gptq"):
        return None  # another scheme (bitsandbytes, fp8, ...): not ours to read
    bits = int(raw.get("bits", raw.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{method} checkpoint with {bits}-bit weights: only 4-bit is supported")
    G = int(raw.get("group_size", raw.get("q_group_size", 128)))
    if method == "awq":
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r}: only the GEMM layout is supported")
        if not raw.get("zero_point", True):
            raise ValueError("AWQ without zero points is not supported")
        return {"method": "awq", "group_size": G, "format": "gemm"}
    fmt = str(raw.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r}: only 'gptq' and 'gptq_v2' are supported")
    return {"method": "gptq", "group_size": G, "format": fmt}


def unpack_module(tensors: dict[str, torch.Tensor], qcfg: dict, in_features: int | None = None
                  ) -> Int4Weights:
    G = qcfg["group_size"]
    if qcfg["method"] == "awq":
        if G <= 0:
            G = in_features or tensors["qweight"].shape[0]
        return awq_unpack(tensors, G)
    if G <= 0:  # -1: one group over the whole input
        G = tensors["qweight"].shape[0] * 8
    return gptq_unpack(tensors, G, qcfg["format"])


# ----- loading -----
def load_prequantized(model: torch.nn.Module, model_dir, dtype: torch.dtype, qcfg: dict) -> None:
    """Fill `model` from an AWQ/GPTQ checkpoint: dense tensors as usual; each quantized linear is
    handed over as its dequantized weight (so every parameter loads) and then replaced by the
    int4 kernel from the exact interchange form."""
    from turbollm.loader.safetensors import cast_floats, iter_safetensors_raw

    quantized: dict[str, Int4Weights] = {}

    def tensors():
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in iter_safetensors_raw(model_dir):
            prefix, _, suffix = name.rpartition(".")
            if suffix not in QUANT_SUFFIXES:
                yield name, cast_floats(t, dtype)
                continue
            parts = pending.setdefault(prefix, {})
            parts[suffix] = t
            if len(parts) == (4 if qcfg["method"] == "gptq" else 3):
                yield from finish(prefix, pending.pop(prefix))
        for prefix, parts in pending.items():  # GPTQ checkpoints without g_idx
            if not {"qweight", "qzeros", "scales"} <= parts.keys():
                raise ValueError(f"{prefix}: incomplete quantized tensors {sorted(parts)}")
            yield from finish(prefix, parts)

    def finish(prefix, parts):
        w = unpack_module(parts, qcfg)
        quantized[prefix] = w
        yield f"{prefix}.weight", w.dequantize().to(dtype)

    model.load_weights(tensors())
    _install_quantized(model, quantized)
    model.checkpoint_quantization = qcfg["method"]


def _install_quantized(model: torch.nn.Module, quantized: dict[str, Int4Weights]) -> None:
    """Install int4 on each linear whose shards all came quantized and fit together; the rest
    keep their dequantized dense weights (logged)."""
    for name, layer, shards in linear_shards(model, quantized, "quantized"):
        merged = _merge_shards(layer, shards)
        if merged is None:
            log.warning("%s: shards differ in group size or act-order permutation; kept dense",
                        name)
            continue
        try:
            install_int4_weights(layer, merged)
        except ValueError as e:  # e.g. a group size the kernels do not take
            log.warning("%s: kept dense (%s)", name, e)


def shards_by_layer(quantized: dict) -> dict[str, dict]:
    """HF-named per-projection values -> {model layer name: {shard id: value}}: q/k/v and
    gate/up become shards of our fused layers, any other projection the one shard None."""
    from turbollm.models.llama import FUSED_SHARDS

    by_layer: dict[str, dict] = {}
    for hf_name, value in quantized.items():
        name, shard = hf_name, None
        for piece, (fused, shard_id) in FUSED_SHARDS.items():
            if name.endswith(f".{piece}"):
                name, shard = name[:-len(piece)] + fused, shard_id
                break
        by_layer.setdefault(name, {})[shard] = value
    return by_layer


def linear_shards(model: torch.nn.Module, quantized: dict, what: str):
    """(name, layer, {shard id: value}) for each linear of the model the checkpoint holds
    `what` values for (shards_by_layer); a name that is not a linear here is logged and skipped,
    and keeps its dense weights."""
    from turbollm.layers.linear import LinearBase

    modules = dict(model.named_modules())
    for name, shards in shards_by_layer(quantized).items():
        layer = modules.get(name)
        if isinstance(layer, LinearBase):
            yield name, layer, shards
        else:
            log.warning("%s: %s in the checkpoint but not a linear here; kept dense", name, what)


def shard_order(layer, shards: dict) -> list | None:
    """The shard ids in row order, or None where they do not cover the layer's rows once each."""
    if None in shards:
        return [None]
    order = sorted(shards, key=lambda s: layer.shard_offset(s)[0])
    offsets = [layer.shard_offset(s) for s in order]
    if len(order) != len({*offsets}) or sum(r for _, r in offsets) != layer.out_features:
        return None
    return order


def _merge_shards(layer, shards: dict) -> Int4Weights | None:
    order = shard_order(layer, shards)
    if order is None:
        return None
    if order == [None]:
        return shards[None]
    parts = [shards[s] for s in order]
    first = parts[0]
    for p in parts[1:]:
        if p.group_size != first.group_size or (p.perm is None) != (first.perm is None) or (
                p.perm is not None and not torch.equal(p.perm, first.perm)):
            return None
    return Int4Weights(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                       torch.cat([p.zeros for p in parts]), first.group_size, first.perm)


# ----- writing -----
def _split_groups(w: Int4Weights, G: int) -> Int4Weights:
    """The same weights with groups of G (a divisor of w.group_size): each group's scale and zero
    repeated — exact."""
    r = w.group_size // G
    return Int4Weights(w.qweight, w.scales.repeat_interleave(r, 1),
                       w.zeros.repeat_interleave(r, 1), G, w.perm)


def write_quantized_checkpoint(model: torch.nn.Module, hf_config: dict, out_dir, method: str,
                               tokenizer=None, checkpoint_format: str = "gptq") -> Path:
    """Write `model` (its decoder linears int4, installed) as an AutoAWQ-GEMM ('awq') or GPTQ
    ('gptq') checkpoint directory: model.safetensors, config.json, tokenizer files. Other
    tensors are written in fp16, as such checkpoints are."""
    from safetensors.torch import save_file

    from turbollm.layers.linear import LinearBase
    from turbollm.models.llama import FUSED_SHARDS
    from turbollm.quantization.int4_result import layer_int4_weights

    if method not in ("awq", "gptq"):
        raise ValueError(f"unknown checkpoint layout {method!r} (awq or gptq)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, Int4Weights] = {}
    tied_head = getattr(model, "lm_head", None) is not None and \
        model.lm_head.weight is model.model.embed_tokens.weight
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase) or (name == "lm_head" and tied_head):
            continue
        base, _, fused = name.rpartition(".")
        # checkpoint pieces of this layer: (HF name, first row, rows)
        pieces = [(f"{base}.{piece}", *module.shard_offset(sid))
                  for piece, (f, sid) in FUSED_SHARDS.items() if f == fused]
        pieces = pieces or [(name, 0, module.out_features)]
        w = layer_int4_weights(module) if module.weight is None else None
        for target, row0, rows in pieces:
            if w is not None:
                quantized[target] = w.rows(row0, rows)
            else:
                state[f"{target}.weight"] = module.weight[row0:row0 + rows].to(torch.float16)
            if module.bias is not None:
                state[f"{target}.bias"] = module.bias[row0:row0 + rows].to(torch.float16)
    for name, p in model.named_parameters():
        mod = name.rpartition(".")[0]
        if not isinstance(model.get_submodule(mod), LinearBase):
            state[name] = p.detach().to(torch.float16)
    state = {k: v.contiguous().clone() for k, v in state.items()}  # no shared storage
    if not quantized:
        raise ValueError("the model has no int4 layers to write")

    G = math.gcd(*(w.group_size for w in quantized.values()))
    if method == "gptq" and checkpoint_format == "gptq":
        if any(float(w.zeros.min()) < 0.5 for w in quantized.values()):
            log.info("a zero point is 0, which the classic GPTQ format cannot store: "
                     "writing checkpoint_format gptq_v2")
            checkpoint_format = "gptq_v2"
    for target, w in quantized.items():
        w = _split_groups(w, G) if w.group_size != G else w
        packed = awq_pack(w) if method == "awq" else gptq_pack(w, checkpoint_format)
        for k, t in packed.items():
            state[f"{target}.{k}"] = t
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    if method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True,
              "version": "gemm"}
    else:
        act_order = any(w.perm is not None for w in quantized.values())
        qc = {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": act_order,
              "sym": False, "checkpoint_format": checkpoint_format}
    cfg = {**hf_config, "torch_dtype": "float16", "quantization_config": qc}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


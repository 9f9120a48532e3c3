"""`turbollm prune` (unstructured and N:M): zero weights of every decoder linear by magnitude,
Wanda or SparseGPT, and write an HF directory with the sparse weights stored in the
compressed-tensors formats (loader/compressed_tensors.py) or dense.

The weights pruned are the checkpoint's own (HF names, fp32; a GGUF file is dequantized); the
calibration activations come from the same model run by the engine in fp32
(compress/calib.py). Embeddings, norms and lm_head stay dense, as llm-compressor leaves them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from turbollm.compress.calib import CalibConfig
from turbollm.compress.prune_scores import METHODS, mask_for

# the prunable weights: every projection inside a decoder layer
PRUNABLE = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float | None = None  # unstructured: fraction of each layer's weights removed
    pattern: tuple[int, int] | None = None  # N:M: keep N of every M consecutive inputs

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError("give exactly one of --sparsity and --pattern")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")

    @property
    def structure(self) -> str:
        """compressed-tensors' sparsity_structure: 'unstructured' or 'N:M'."""
        return "unstructured" if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"


def prunable_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in tensors if PRUNABLE.match(n)]


@torch.no_grad()
def prune_tensors(tensors: dict[str, torch.Tensor], cfg: PruneConfig, stats: dict | None,
                  progress: bool = True) -> float:
    """Prune the decoder linears of `tensors` (HF names, fp32) in place; `stats` from
    calib.linear_stats (None for magnitude). Returns the fraction of their weights now zero."""
    from tqdm import tqdm
    names = prunable_names(tensors)
    if not names:
        raise ValueError("no decoder-layer projections (model.layers.N.*_proj.weight) to prune")
    zeros = total = 0
    threads = torch.get_num_threads()
    # a layer's ops are ~1M elements each: one thread is as fast, and 4x faster than two on a
    # busy 2-core machine (measured: 3.6 s vs 14 s of CPU for Wanda on SmolLM2's 210 linears)
    torch.set_num_threads(1)
    try:
        for name in tqdm(names, desc=f"pruning ({cfg.method}, {cfg.sparsity or cfg.structure})",
                         unit="linear", disable=not progress):
            w = tensors[name].float()
            st = None if stats is None else stats.get(name[:-len(".weight")])
            if cfg.needs_calibration and st is None:
                raise ValueError(f"no calibration statistics for {name}")
            if cfg.method == "sparsegpt":
                w = _sparsegpt(w, st.hessian, cfg)
            else:
                w = w * mask_for(cfg.method, w, None if st is None else st.channel_norm,
                                 cfg.sparsity, cfg.pattern)
            tensors[name] = w
            zeros += int((w == 0).sum())
            total += w.numel()
    finally:
        torch.set_num_threads(threads)
    return zeros / total


def _sparsegpt(w: torch.Tensor, hessian: torch.Tensor, cfg: PruneConfig) -> torch.Tensor:
    from turbollm.compress.sparsegpt import sparsegpt_prune
    block = 128 if cfg.pattern is None or 128 % cfg.pattern[1] == 0 else cfg.pattern[1] * 16
    return sparsegpt_prune(w, hessian, cfg.sparsity, cfg.pattern, block=block)


def pruned_state(llm, source_tensors: dict[str, torch.Tensor], cfg: PruneConfig,
                 calib: CalibConfig, progress: bool = True) -> tuple[dict, float]:
    """A pruned copy of `source_tensors` (HF names, fp32) and its decoder-linear sparsity,
    calibrated on `llm` (the same model in fp32, see calib.calibration_llm)."""
    from turbollm.compress.calib import linear_stats
    stats = None
    if cfg.needs_calibration:
        stats = linear_stats(llm, calib, hessian=cfg.method == "sparsegpt", progress=progress)
    tensors = dict(source_tensors)
    sparsity = prune_tensors(tensors, cfg, stats, progress)
    return tensors, sparsity


def save_pruned(out_dir, tensors: dict[str, torch.Tensor], cfg: PruneConfig, sparsity: float,
                hf_config: dict, tokenizer, dtype: str = "auto",
                save_format: str = "compressed") -> Path:
    """Write the pruned model: decoder linears in sparse-24-bitmask (2:4) or sparse-bitmask
    (anything else) with save_format 'compressed', or every tensor dense with 'dense'."""
    from turbollm.compress.model_out import DTYPES, output_dtype, write_model_dir
    from turbollm.loader.compressed_tensors import (BITMASK, SPARSE_24, compress_state_dict,
                                                    sparsity_entry)
    if save_format not in ("compressed", "dense"):
        raise ValueError(f"save format must be compressed or dense, got {save_format!r}")
    dtype = output_dtype(dtype, hf_config)
    state = {n: t.to(DTYPES[dtype]) if t.is_floating_point() else t for n, t in tensors.items()}
    qc = None
    if save_format == "compressed":
        fmt = SPARSE_24 if cfg.pattern == (2, 4) else BITMASK
        state = compress_state_dict(state, fmt, lambda n: PRUNABLE.match(n) is not None)
        qc = sparsity_entry(fmt, cfg.structure, sparsity)
    return write_model_dir(out_dir, state, hf_config, tokenizer, dtype, qc)


def prune_model(model: str, cfg: PruneConfig, out_dir, calib: CalibConfig | None = None,
                dtype: str = "auto", save_format: str = "compressed",
                progress: bool = True) -> tuple[Path, float]:
    """`turbollm prune MODEL --method ... --out DIR`: returns (DIR, achieved sparsity)."""
    from turbollm.compress.calib import calibration_llm
    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.model_loader import iter_checkpoint, read_arch
    source = resolve_model(model, "auto")
    if source.kind == "preset":
        raise ValueError(f"{model!r} is a config preset without weights: nothing to prune")
    _, hf_config = read_arch(source)
    llm = calibration_llm(model) if cfg.needs_calibration else None
    source_tensors = dict(iter_checkpoint(source, torch.float32))
    tensors, sparsity = pruned_state(llm, source_tensors, cfg, calib or CalibConfig(), progress)
    tokenizer = llm.tokenizer if llm is not None else _tokenizer(source)
    out = save_pruned(out_dir, tensors, cfg, sparsity, hf_config, tokenizer, dtype, save_format)
    return out, sparsity


def _tokenizer(source):
    from turbollm.worker.model_loader import load_tokenizer_for
    return load_tokenizer_for(source, None)

"""GPU catalog: published memory, bandwidth, dense throughput per dtype, interconnect and price.

Numbers are the vendors' datasheet values for *dense* math (no 2:4 sparsity), SXM/PCIe form
factor as named. Prices are indicative on-demand $/GPU-hour (mid-2025 list prices of common
clouds); they change often, so `--price` or a JSON catalog (`load_catalog`) overrides them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# Which dtype's peak we fall back to when a device has no number for the one asked for:
# weight-only formats compute in the activation dtype, so bf16/fp16 are the usual fallback.
_FALLBACK = {"fp8": "bf16", "int8": "bf16", "fp16": "bf16", "bf16": "fp16", "fp32": "bf16"}


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator's published numbers (per device, not per node)."""

    name: str
    memory_gb: float  # decimal GB as published (1 GB = 1e9 bytes)
    bandwidth_gbps: float  # HBM/GDDR read bandwidth, GB/s
    tflops: dict[str, float] = field(default_factory=dict)  # dense peak per compute dtype
    interconnect_gbps: float = 32.0  # per-GPU, per-direction bandwidth to peers (all-reduce)
    allreduce_latency_us: float = 10.0  # fixed cost of one all-reduce call (launch + sync)
    price_per_hour: float = 0.0  # $ per GPU-hour
    notes: str = ""
    default_mfu: float = 0.5  # share of peak FLOP/s reached by real inference matmuls
    default_mbu: float = 0.75  # share of peak bandwidth reached by real decode steps
    preferred_dtype: str = "bf16"  # activation dtype to plan with when none is given
    # measured MBU per weight format where it differs from default_mbu (--hardware local: a
    # CPU's int4 kernel is bound by unpacking, not by memory, so it reads slower than fp32)
    mbu_by_weights: tuple[tuple[str, float], ...] = ()

    def mbu_for(self, weights: str) -> float:
        """Default MBU for a weight format (fp32, bf16, int8, int4, ...)."""
        return dict(self.mbu_by_weights).get(weights, self.default_mbu)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for a compute dtype, falling back to the activation dtype."""
        seen = set()
        d = dtype
        while d not in self.tflops:
            seen.add(d)
            d = _FALLBACK.get(d, "bf16")
            if d in seen:
                raise ValueError(f"{self.name}: no throughput number for {dtype!r}")
        return self.tflops[d] * 1e12

    def supports(self, dtype: str) -> bool:
        """True when the device has native tensor-core math for `dtype`."""
        return dtype in self.tflops


# NVLink numbers are per direction (the datasheets quote both directions summed); PCIe Gen4 x16
# is ~32 GB/s and Gen5 ~64 GB/s per direction. Consumer cards without P2P go through host memory.
_NVLINK3, _NVLINK4, _PCIE4, _PCIE5 = 300.0, 450.0, 32.0, 64.0

CATALOG: dict[str, GPUSpec] = {g.name: g for g in [
    GPUSpec("A100-40GB", 40, 1555, {"fp32": 19.5, "bf16": 312, "fp16": 312, "int8": 624},
            _NVLINK3, 10, 1.29, "SXM4, NVLink 3"),
    GPUSpec("A100-80GB", 80, 2039, {"fp32": 19.5, "bf16": 312, "fp16": 312, "int8": 624},
            _NVLINK3, 10, 1.79, "SXM4, NVLink 3"),
    GPUSpec("H100-SXM", 80, 3350,
            {"fp32": 67, "bf16": 989, "fp16": 989, "fp8": 1979, "int8": 1979},
            _NVLINK4, 8, 2.99, "SXM5, NVLink 4"),
    GPUSpec("H100-PCIe", 80, 2000,
            {"fp32": 51, "bf16": 756, "fp16": 756, "fp8": 1513, "int8": 1513},
            _PCIE5, 20, 2.49, "PCIe Gen5, no NVLink bridge assumed"),
    GPUSpec("H200", 141, 4800,
            {"fp32": 67, "bf16": 989, "fp16": 989, "fp8": 1979, "int8": 1979},
            _NVLINK4, 8, 3.79, "SXM, NVLink 4"),
    GPUSpec("L4", 24, 300, {"fp32": 30.3, "bf16": 121, "fp16": 121, "fp8": 242.5, "int8": 242.5},
            _PCIE4, 25, 0.80, "PCIe Gen4"),
    GPUSpec("L40S", 48, 864, {"fp32": 91.6, "bf16": 362, "fp16": 362, "fp8": 733, "int8": 733},
            _PCIE4, 25, 1.49, "PCIe Gen4"),
    GPUSpec("A10G", 24, 600, {"fp32": 31.2, "bf16": 70, "fp16": 70, "int8": 140},
            _PCIE4, 25, 1.01, "AWS g5; PCIe Gen4"),
    GPUSpec("RTX-A6000", 48, 768, {"fp32": 38.7, "bf16": 154.8, "fp16": 154.8, "int8": 309.7},
            _PCIE4, 25, 0.80, "PCIe Gen4 (NVLink bridge not assumed)"),
    GPUSpec("RTX-4090", 24, 1008,
            {"fp32": 82.6, "bf16": 165.2, "fp16": 165.2, "fp8": 330.3, "int8": 660.6},
            _PCIE4 / 2, 40, 0.69, "GeForce: fp32-accumulate rates; no P2P, all-reduce via host"),
]}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def get_gpu(name: str, catalog: dict[str, GPUSpec] | None = None) -> GPUSpec:
    """Look a GPU up by name, ignoring case and punctuation ('h100 sxm', 'a100_80gb')."""
    catalog = CATALOG if catalog is None else catalog
    key = _norm(name)
    matches = [g for n, g in catalog.items() if _norm(n) == key]
    if not matches:  # allow a unique prefix: 'h200', 'a6000' -> 'RTX-A6000'
        matches = [g for n, g in catalog.items() if key and key in _norm(n)]
    if len(matches) != 1:
        known = ", ".join(catalog)
        what = "ambiguous" if matches else "unknown"
        raise ValueError(f"{what} GPU {name!r}; known: {known}, or 'local'")
    return matches[0]


def load_catalog(path: str | Path, base: dict[str, GPUSpec] | None = None) -> dict[str, GPUSpec]:
    """Merge a JSON catalog ({name: {field: value}}) over the built-in one.

    Entries with a known name update only the fields given (e.g. just `price_per_hour`);
    new names must give memory_gb and bandwidth_gbps.
    """
    merged = dict(CATALOG if base is None else base)
    data: dict[str, dict[str, Any]] = json.loads(Path(path).read_text())
    allowed = {f.name for f in fields(GPUSpec)}
    for name, entry in data.items():
        unknown = set(entry) - allowed
        if unknown:
            raise ValueError(f"catalog entry {name!r}: unknown fields {sorted(unknown)}")
        if name in merged:
            merged[name] = replace(merged[name], **entry)
        else:
            merged[name] = GPUSpec(name=name, **{k: v for k, v in entry.items() if k != "name"})
    return merged

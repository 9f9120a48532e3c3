"""Engine configurations to compare, as plain engine keyword arguments.

A configuration is (name, kwargs) where kwargs go straight to `LLM(...)`; the matrix lists every
technique the engine has a switch for, whether or not it is implemented yet: the engine itself
says "not available" (a ValueError at construction), so a technique shows up in the bench the
moment its implementation lands, with no edit here.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchConfig:
    name: str
    kwargs: dict = field(default_factory=dict)
    peer: str | None = None  # "hf" / "llamacpp": measured by a peer engine, not ours
    # every request runs with a random adapter of this rank (bench/lora_rows.py)
    lora_rank: int | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "kwargs": self.kwargs, "peer": self.peer,
                "lora_rank": self.lora_rank}


def technique_configs(num_layers: int | None = None) -> list[BenchConfig]:
    """Every technique the engine has an option for, one switch at a time over the defaults."""
    draft_layers = max(1, (num_layers or 4) // 4)  # self-speculation on a quarter of the layers
    return [
        BenchConfig("int8", {"quantization": "int8"}),
        BenchConfig("int4", {"quantization": "int4"}),
        BenchConfig("fp8", {"quantization": "fp8"}),
        BenchConfig("awq", {"quantization": "awq"}),
        BenchConfig("gptq", {"quantization": "gptq"}),
        BenchConfig("gguf-native", {"quantization": "gguf"}),
        BenchConfig("kv-fp16", {"kv_cache_dtype": "float16"}),
        BenchConfig("kv-bf16", {"kv_cache_dtype": "bfloat16"}),
        BenchConfig("kv-int8", {"kv_cache_dtype": "int8"}),
        BenchConfig("kv-fp8", {"kv_cache_dtype": "fp8_e4m3"}),
        BenchConfig("no-prefix-cache", {"enable_prefix_caching": False}),
        BenchConfig("spec-ngram", {"speculative_method": "ngram", "num_speculative_tokens": 4}),
        BenchConfig("spec-draft", {"speculative_method": "draft", "num_speculative_tokens": 4,
                                   "draft_layers": draft_layers}),
        # a pruned model's linears read bitmask-compressed at decode (a no-op on a dense one)
        BenchConfig("sparse-bitmask", {"sparsity": "bitmask"}),
        BenchConfig("int8-sparse-bitmask", {"quantization": "int8", "sparsity": "bitmask"}),
        BenchConfig("dense-weights", {"sparsity": "none"}),
        BenchConfig("lora-r16", {"enable_lora": True}, lora_rank=16),
        BenchConfig("lora-r64", {"enable_lora": True}, lora_rank=64),
    ]


# Dense weights at each precision (quantization=none: a GGUF file is dequantized, not served in
# its own format; an explicit bfloat16 computes in bf16 where the CPU has bf16 math), then the
# engine's defaults as a user gets them (for the bundled GGUF: its
# Q4_1/Q8_0 layers served natively), which the technique switches are applied on top of.
DTYPE_CONFIGS = [BenchConfig("fp32", {"dtype": "float32", "quantization": "none"}),
                 BenchConfig("bf16", {"dtype": "bfloat16", "quantization": "none"}),
                 BenchConfig("fp16", {"dtype": "float16", "quantization": "none"}),
                 # dense weights in the default dtype (auto: bf16 storage, the math the
                 # kernels of this machine want): issue 4/25's "dense bf16" baseline
                 BenchConfig("dense", {"quantization": "none"}),
                 BenchConfig("default", {})]

PEER_DTYPES = {"quick": ["float32"], "full": ["float32", "bfloat16"]}


def build_matrix(num_layers: int | None, only: list[str] | None = None,
                 extra: dict[str, dict] | None = None) -> list[BenchConfig]:
    """fp32 (the quality baseline) first, bf16, fp16, defaults, every technique, then `extra`
    (kept when `only` picks a subset)."""
    configs = [BenchConfig(c.name, dict(c.kwargs), c.peer, c.lora_rank) for c in DTYPE_CONFIGS]
    configs += technique_configs(num_layers)
    added = [BenchConfig(name, kw) for name, kw in (extra or {}).items()]
    if only:
        known = {c.name: c for c in configs + added}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: "
                             f"{', '.join(known)}")
        configs = [known[n] for n in only]
    return configs + [c for c in added if c not in configs]


def peer_configs(peers: list[str], dtypes: list[str]) -> list[BenchConfig]:
    """Peers at the same dtypes as ours (llama.cpp runs the GGUF file as it is)."""
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        raise ValueError(f"unknown peer dtype(s) {', '.join(bad)}: choose from float32, "
                         "bfloat16, float16")
    out = []
    for peer in peers:
        if peer == "hf":
            out += [BenchConfig(f"hf-{_short(d)}", {"dtype": d}, peer="hf") for d in dtypes]
        elif peer == "llamacpp":
            out.append(BenchConfig("llamacpp", {}, peer="llamacpp"))
        else:
            raise ValueError(f"unknown peer {peer!r}: choose from hf, llamacpp")
    return out


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)

"""The one sizing function for KV-cache bytes, shared by the engine's cache and the planner.

No torch here (the torch-free core's configuration imports it): a torch dtype is read through
its `itemsize`.
"""
from __future__ import annotations

from typing import Any

from turbollm.model_arch import ModelArch

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4,
    "float16": 2, "fp16": 2, "half": 2,
    "bfloat16": 2, "bf16": 2,
    "fp8": 1, "fp8_e4m3": 1, "int8": 1,
}


def dtype_bytes(dtype: str | Any) -> int:
    """Bytes per element of a dtype given as a torch dtype or a name."""
    if not isinstance(dtype, str):
        return dtype.itemsize
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


def kv_cache_bytes_per_token(arch: ModelArch, kv_dtype: str | Any,
                             scale_bytes_per_head: int | None = None) -> int:
    """Bytes of K and V one token occupies: 2 x layers x kv_heads x (head_dim x bytes + scale).

    `scale_bytes_per_head` is the per-token, per-head scale of a quantized cache (K and V each);
    by default the engine's own: an fp16 scale for 'int8', none for other dtypes.
    """
    if scale_bytes_per_head is None:
        scale_bytes_per_head = 2 if kv_dtype == "int8" else 0
    per_head = arch.head_dim * dtype_bytes(kv_dtype) + scale_bytes_per_head
    return 2 * arch.num_hidden_layers * arch.num_key_value_heads * per_head


def num_kv_blocks(memory_bytes: int, block_size: int, bytes_per_token: int) -> int:
    """How many KV blocks of `block_size` tokens fit in a memory budget."""
    return int(memory_bytes // (block_size * bytes_per_token))


def parse_memory_size(text: str | int | float) -> int:
    """'2GiB', '512MB', '1.5G', 1073741824 -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = text.strip().lower().replace(" ", "")
    units = [("gib", 2**30), ("mib", 2**20), ("kib", 2**10), ("gb", 10**9), ("mb", 10**6),
             ("kb", 10**3), ("g", 2**30), ("m", 2**20), ("k", 2**10), ("b", 1)]
    for suffix, mult in units:
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(float(s))

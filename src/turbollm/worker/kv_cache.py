"""Sizing and allocating the paged KV cache (the sizing function is shared with the planner)."""
from __future__ import annotations

import torch

from turbollm.model_arch import ModelArch
from turbollm.sizing import kv_cache_bytes_per_token, num_kv_blocks

CPU_DEFAULT_KV_BYTES = 2 * 2**30


def allocate_kv_cache(arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: str) -> torch.Tensor:
    """One zeroed tensor [layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim].

    Zeroed because attention multiplies masked (zero-probability) slots by their values:
    uninitialized NaNs there would poison the output.
    """
    return torch.zeros(arch.num_hidden_layers, 2, num_blocks, block_size,
                       arch.num_key_value_heads, arch.head_dim, dtype=dtype, device=device)


def layer_views(cache: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k_cache, v_cache) of each layer, each [num_blocks, block_size, kv_heads, head_dim]."""
    return [(cache[i, 0], cache[i, 1]) for i in range(cache.shape[0])]


def kv_budget_bytes(requested: int | None, device: str, reserved_after_warmup: int | None = None,
                    gpu_fraction: float = 0.9) -> int:
    """The KV budget: as asked, or a CPU default, or what is left of the GPU after warm-up."""
    if requested is not None:
        return requested
    if not device.startswith("cuda"):
        return CPU_DEFAULT_KV_BYTES
    free, total = torch.cuda.mem_get_info(torch.device(device))
    used = reserved_after_warmup if reserved_after_warmup is not None else total - free
    return max(0, int(total * gpu_fraction) - used)


def blocks_for_budget(arch: ModelArch, budget: int, block_size: int, dtype: torch.dtype) -> int:
    """How many blocks the budget holds, by the one sizing function."""
    return num_kv_blocks(budget, block_size, kv_cache_bytes_per_token(arch, dtype))

"""Sizing and allocating the paged KV cache (the sizing function is shared with the planner)."""
from __future__ import annotations

import torch

import turbollm.platform_info as platform_info
from turbollm.attention.kv_quant import QuantKVCache, allocate_quant_kv_cache
from turbollm.model_arch import ModelArch
from turbollm.sizing import kv_cache_bytes_per_token, num_kv_blocks

CPU_DEFAULT_KV_BYTES = 2 * 2**30
FLOAT_KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def allocate_kv_cache(arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: str, kv_cache_dtype: str = "auto"):
    """One zeroed tensor [layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim]
    (kv_cache_dtype 'auto': in `dtype`; float16/bfloat16: in that dtype), or for int8 /
    fp8_e4m3 a QuantKVCache of that shape.

    Zeroed because attention multiplies masked (zero-probability) slots by their values:
    uninitialized NaNs there would poison the output.
    """
    if kv_cache_dtype in FLOAT_KV_DTYPES:
        dtype = FLOAT_KV_DTYPES[kv_cache_dtype]
    elif kv_cache_dtype != "auto":
        return allocate_quant_kv_cache(arch.num_hidden_layers, num_blocks, block_size,
                                       arch.num_key_value_heads, arch.head_dim, kv_cache_dtype,
                                       device)
    return torch.zeros(arch.num_hidden_layers, 2, num_blocks, block_size,
                       arch.num_key_value_heads, arch.head_dim, dtype=dtype, device=device)


def layer_views(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k_cache, v_cache) of each layer, each [num_blocks, block_size, kv_heads, head_dim]."""
    if isinstance(cache, QuantKVCache):
        return cache.layer_views()
    return [(cache[i, 0], cache[i, 1]) for i in range(cache.shape[0])]


def kv_budget_bytes(requested: int | None, device: str, reserved_after_warmup: int | None = None,
                    gpu_fraction: float = 0.9) -> int:
    """The KV budget: as asked, or a CPU default, or what is left of the GPU after warm-up."""
    if requested is not None:
        check_fits(requested, device)
        return requested
    if not device.startswith("cuda"):
        return CPU_DEFAULT_KV_BYTES
    free, total = torch.cuda.mem_get_info(torch.device(device))
    used = reserved_after_warmup if reserved_after_warmup is not None else total - free
    return max(0, int(total * gpu_fraction) - used)


def check_fits(requested: int, device: str) -> None:
    """An asked-for KV budget larger than the device's free memory is an error now, naming the
    flag: on CPU the allocation itself would succeed (memory is overcommitted) and the process
    would be killed later, once the cache fills."""
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = platform_info.available_memory_bytes()
    if free is not None and requested > free:
        raise ValueError(f"kv_cache_memory ({requested / 2**30:.2f} GiB) is more than the "
                         f"{free / 2**30:.2f} GiB free on {device}; lower --kv-cache-memory")


def kv_storage_dtype(dtype, kv_cache_dtype: str = "auto"):
    """What the cache stores: the model's `dtype` for 'auto', else the kv_cache_dtype name."""
    return dtype if kv_cache_dtype == "auto" else kv_cache_dtype


def blocks_for_budget(arch: ModelArch, budget: int, block_size: int, dtype: torch.dtype,
                      kv_cache_dtype: str = "auto") -> int:
    """How many blocks the budget holds, by the one sizing function."""
    kv_dtype = kv_storage_dtype(dtype, kv_cache_dtype)
    return num_kv_blocks(budget, block_size, kv_cache_bytes_per_token(arch, kv_dtype))


@torch.inference_mode()
def profile_peak_bytes(model: torch.nn.Module, arch: ModelArch, num_tokens: int, block_size: int,
                       dtype: torch.dtype, device: str, num_sampled_rows: int = 1) -> int:
    """Run one prefill of `num_tokens` tokens (the largest step), with logits and probabilities
    for `num_sampled_rows` rows (the most a step samples), and return the device's peak
    allocated bytes (weights + activations), so the KV cache can take what is left.

    On CPU the pass still runs (it checks the path end to end) and 0 is returned.
    """
    from turbollm.attention.backend import AttentionMetadata
    n_blocks = -(-num_tokens // block_size)
    cache = allocate_kv_cache(arch, n_blocks, block_size, dtype, device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    pos = torch.arange(num_tokens, device=device)
    meta = AttentionMetadata(slot_mapping=pos.clone(), num_decodes=0, decode_block_tables=None,
                             decode_seq_lens=None,
                             prefills=[(0, num_tokens, num_tokens,
                                        torch.arange(n_blocks, device=device))],
                             block_size=block_size)
    is_cuda = device.startswith("cuda")
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    hidden = model(ids, pos, layer_views(cache), meta)
    rows = max(1, min(num_sampled_rows, num_tokens))
    model.compute_logits(hidden[-rows:]).softmax(-1)  # [rows, vocab] fp32, like the sampler
    del cache, hidden
    if not is_cuda:
        return 0
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    return peak

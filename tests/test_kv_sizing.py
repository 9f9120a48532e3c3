"""KV-cache sizing: one function for engine and planner; the warm-up profile pass."""
import pytest
import torch

from turbollm import LLM
from turbollm.sizing import kv_cache_bytes_per_token, parse_memory_size
from turbollm.worker.kv_cache import profile_peak_bytes


def test_engine_blocks_follow_the_sizing_function(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="4MiB", block_size=16)
    per_token = kv_cache_bytes_per_token(llm.engine.arch, torch.float32)
    assert per_token == 2 * 2 * 2 * 16 * 4  # 2 x layers x kv_heads x head_dim x bytes
    assert llm.engine.num_kv_blocks == 4 * 2**20 // (16 * per_token)
    assert llm.engine.executor.worker.kv_cache.numel() * 4 == llm.engine.num_kv_blocks * 16 * per_token


def test_parse_memory_size():
    assert parse_memory_size("2GiB") == 2 * 2**30
    assert parse_memory_size("512MB") == 512 * 10**6
    assert parse_memory_size(1024) == 1024


def test_profile_pass_runs_on_cpu(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="4MiB")
    w = llm.engine.executor.worker
    assert profile_peak_bytes(w.model, w.loaded.arch, 100, 16, w.loaded.dtype, "cpu",
                              num_sampled_rows=32) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CPU path is tested above)")
def test_cuda_cache_takes_what_warmup_leaves(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="bfloat16", device="cuda")
    free, total = torch.cuda.mem_get_info()
    assert llm.engine.num_kv_blocks > 0 and free < 0.2 * total

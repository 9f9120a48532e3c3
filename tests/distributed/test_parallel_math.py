"""The split arithmetic of tensor/pipeline parallelism, and the config checks (no processes)."""
import pytest

from turbollm.config import EngineConfig
from turbollm.distributed.parallel_state import head_split, stage_layers, vocab_split


def test_stage_layers_cover_every_layer_once_and_in_order():
    for layers, pp in ((30, 4), (2, 2), (7, 3), (5, 1)):
        ranges = [stage_layers(layers, pp, r) for r in range(pp)]
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="exceeds"):
        stage_layers(2, 3, 0)


def test_the_last_stage_takes_fewer_layers_for_the_lm_head():
    # TinyLlama's shape: the head is worth ~1.5 layers, so 12 + 10 (max 12 layers of work)
    # beats 11 + 11 (12.5)
    assert [stage_layers(22, 2, r, 1.49) for r in range(2)] == [(0, 12), (12, 22)]
    # a head worth more than the stage's share still leaves it one layer
    assert [stage_layers(8, 4, r, 9.0) for r in range(4)] == [(0, 3), (3, 5), (5, 7), (7, 8)]


def test_head_split_splits_kv_heads_or_replicates_the_one_a_rank_reads():
    # 4 query heads, 2 KV heads, 2 ranks: one KV head each
    assert [head_split(4, 2, 2, r) for r in range(2)] == [(2, 0, 1), (2, 1, 1)]
    # 8 query heads, 2 KV heads (groups of 4), 4 ranks: ranks 0-1 read KV head 0, 2-3 head 1
    assert [head_split(8, 2, 4, r) for r in range(4)] == [(2, 0, 1), (2, 0, 1), (2, 1, 1),
                                                          (2, 1, 1)]
    with pytest.raises(ValueError, match="attention heads"):
        head_split(9, 3, 2, 0)
    with pytest.raises(ValueError, match="multiple of 3"):
        head_split(12, 3, 4, 0)


def test_vocab_split_pads_the_last_shard():
    assert [vocab_split(10, 3, r) for r in range(3)] == [(0, 4), (4, 4), (8, 4)]


def test_config_refuses_what_parallelism_does_not_run_yet():
    with pytest.raises(ValueError, match="LoRA"):
        EngineConfig.from_kwargs(tensor_parallel_size=2, enable_lora=True)
    with pytest.raises(ValueError, match="draft"):
        EngineConfig.from_kwargs(pipeline_parallel_size=2, speculative_method="draft")
    with pytest.raises(ValueError, match="awq"):
        EngineConfig.from_kwargs(tensor_parallel_size=2, quantization="awq")
    cfg = EngineConfig.from_kwargs(tensor_parallel_size=2, pipeline_parallel_size=3)
    assert cfg.parallel.world_size == 6 and cfg.parallel.threads_per_worker() >= 1


def test_cli_flags_and_short_aliases():
    import argparse

    from turbollm.cli_args import add_engine_args, engine_kwargs
    p = argparse.ArgumentParser()
    add_engine_args(p)
    kw = engine_kwargs(p.parse_args(["-tp", "2", "-pp", "3", "--cpu-threads-per-worker", "1"]))
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"],
            kw["cpu_threads_per_worker"]) == (2, 3, 1)


def test_bind_cores_gives_each_rank_its_own_group_or_none():
    import os

    from turbollm.executor.worker_main import bind_cores
    allowed = sorted(os.sched_getaffinity(0))
    try:
        assert bind_cores(0, len(allowed) + 1, 1) is None  # does not fit: left alone
        assert sorted(os.sched_getaffinity(0)) == allowed
        last = bind_cores(len(allowed) - 1, len(allowed), 1)
        assert last == [allowed[-1]] and sorted(os.sched_getaffinity(0)) == last
    finally:
        os.sched_setaffinity(0, allowed)


def test_planner_kv_bytes_per_gpu_agree_with_a_ranks_cache():
    """`turbollm plan` sizes a GPU's KV cache with the same split the ranks use."""
    from turbollm.distributed.parallel_state import rank_arch
    from turbollm.model_arch import ModelArch
    from turbollm.plan.memory import kv_bytes_per_token, kv_scale_bytes
    from turbollm.sizing import kv_cache_bytes_per_token
    for heads, kv_heads, tp in ((32, 8, 2), (32, 8, 8), (64, 8, 16), (9, 3, 3), (8, 1, 4)):
        arch = ModelArch("llama", hidden_size=64 * heads, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=100, head_dim=64)
        for kv_dtype in ("bfloat16", "int8"):
            rank = rank_arch(arch, tp, tp - 1, arch.num_hidden_layers)
            assert kv_bytes_per_token(arch, kv_dtype, tp) == kv_cache_bytes_per_token(
                rank, kv_dtype, kv_scale_bytes(kv_dtype))

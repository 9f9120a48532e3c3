"""Latency: FLOPs, roofline times, tensor-parallel all-reduce and monotonicity."""
from dataclasses import replace

import pytest

from turbollm.plan.cost_model import estimate
from turbollm.plan.hardware import CATALOG
from turbollm.plan.latency import (allreduce_time, comm_time, decode_step_time,
                                   flops_per_token, prefill_time)
from turbollm.plan.models import load_model
from turbollm.plan.setup import Efficiency, Precision, Setup, Workload

_, L70 = load_model("Llama-2-70B")
_, L8 = load_model("Llama-3-8B")
A100, H100 = CATALOG["A100-80GB"], CATALOG["H100-SXM"]


def test_llama2_70b_needs_about_140_gflop_per_token():
    # 2 FLOPs per weight (68.7 B matmul weights) plus attention over the context
    assert flops_per_token(L70) == pytest.approx(137.4e9, rel=0.01)
    assert flops_per_token(L70, context=1024) == pytest.approx(140e9, rel=0.01)


def test_prefill_64x512_on_8_a100_at_60_percent_mfu_takes_about_3_1_s():
    s = Setup(L70, A100, 8, efficiency=Efficiency(mfu=0.6))
    p = prefill_time(s, 64, 512)
    # by hand: 64 x 512 tokens x 2 x 69e9 FLOP / (8 x 312e12 x 0.6) = 3.02 s
    assert p.bound == "compute"
    assert p.compute_s == pytest.approx(3.1, rel=0.05)
    # + all-reduces: 160 x (10 us + 2 x 7/8 x (32768 x 8192 x 2 B) / (300 GB/s x 0.7))
    by_hand = 160 * (10e-6 + 1.75 * 32768 * 8192 * 2 / (300e9 * 0.7))
    assert p.comm_s == pytest.approx(by_hand, rel=1e-9)
    assert p.total_s == pytest.approx(p.compute_s + p.comm_s, rel=1e-9)


def test_batch1_decode_is_weight_bandwidth_bound_by_hand():
    s = Setup(L8, H100, 1, efficiency=Efficiency(mfu=0.5, mbu=0.8))
    step = decode_step_time(s, 1, context=1000)
    # weights read: all matmuls + lm_head (embedding table gathered, not streamed) + norms
    weights = 2 * (32 * L8.linear_params_per_layer() + 128256 * 4096) + 2 * (65 * 4096)
    kv = 1000 * 131072  # 2 x 32 x 8 x 128 x 2 bytes per token
    assert step.memory_s == pytest.approx((weights + kv) / (3350e9 * 0.8), rel=1e-9)
    assert step.bound == "memory"
    assert step.total_s == step.memory_s


def test_allreduce_follows_the_ring_formula():
    s = Setup(L70, H100, 4, efficiency=Efficiency(comm_eff=0.5))
    assert allreduce_time(s, 1e9) == pytest.approx(8e-6 + 1.5 * 1e9 / (450e9 * 0.5))
    assert comm_time(Setup(L70, H100, 1), 10_000) == 0.0


def test_more_batch_gives_more_throughput_and_higher_per_token_latency():
    s = Setup(L8, H100, 1)
    prev = None
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        e = estimate(s, Workload(512, 256, b))
        if prev is not None:
            assert e.output_tokens_per_s > prev.output_tokens_per_s
            assert e.tpot_s > prev.tpot_s and e.ttft_s >= prev.ttft_s
            assert e.cost.per_1k_completion < prev.cost.per_1k_completion
        prev = e


def test_int4_reads_fewer_weight_bytes_and_decodes_faster_at_batch_1():
    w = Workload(512, 256, 1)
    times = {q: estimate(Setup(L8, H100, 1, Precision(weights=q)), w).tpot_s
             for q in ("bf16", "fp8", "int8", "int4")}
    assert times["int4"] < times["int8"] < times["bf16"]
    assert times["fp8"] < times["bf16"]


def test_longer_prompts_and_completions_cost_more_time():
    s = Setup(L8, H100, 1)
    base = estimate(s, Workload(512, 256, 4))
    assert estimate(s, Workload(2048, 256, 4)).ttft_s > base.ttft_s
    assert estimate(s, Workload(512, 1024, 4)).e2e_s > base.e2e_s


def test_fp8_uses_fp8_tensor_cores_only_where_they_exist():
    fp8 = Precision(weights="fp8")
    assert fp8.compute_dtype(H100) == "fp8"
    assert fp8.compute_dtype(A100) == "bf16"  # weight-only: dequantized to bf16
    assert Precision(weights="int8").compute_dtype(H100) == "bf16"
    assert Precision(weights="int8", compute="int8").compute_dtype(H100) == "int8"
    big = Workload(2048, 16, 16)
    fast = estimate(Setup(L8, H100, 1, fp8), big).prefill.compute_s
    slow = estimate(Setup(L8, H100, 1, replace(fp8, compute="bf16")), big).prefill.compute_s
    assert fast == pytest.approx(slow * 989 / 1979)


def test_overhead_and_tensor_parallel_validation():
    s = Setup(L8, H100, 1, efficiency=Efficiency(overhead_s=0.002))
    assert decode_step_time(s, 1, 100).overhead_s == 0.002
    _, f7 = load_model("Falcon-7B")
    with pytest.raises(ValueError, match="71 attention heads"):
        Setup(f7, H100, 2)
    with pytest.raises(ValueError, match="mfu"):
        Efficiency(mfu=1.5)

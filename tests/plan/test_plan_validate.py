"""`--hardware local` measurement and the planner-vs-engine comparison plumbing."""
import time

import pytest

from turbollm.plan.hardware import GPUSpec
from turbollm.plan.local_hw import measure_local
from turbollm.plan.validate import (EngineTiming, compare_with_engine, predict_batch1,
                                    time_generate)

# A fixed "local" machine so the comparison test does not depend on this machine's speed.
FAKE_CPU = GPUSpec("fake-cpu", memory_gb=16, bandwidth_gbps=20, tflops={"fp32": 0.2, "bf16": 1.0},
                   interconnect_gbps=0, default_mfu=0.7, default_mbu=0.8, preferred_dtype="bf16")


def test_measure_local_reports_positive_rates_and_is_cached():
    spec = measure_local(bandwidth_bytes=32 << 20, max_matmul_n=256)
    assert spec.name.startswith("local")
    assert spec.bandwidth_gbps > 0.1 and spec.memory_gb > 0.1
    assert spec.tflops["fp32"] > 0 and spec.tflops["bf16"] > 0
    assert spec.preferred_dtype == "bf16"  # what the engine's dtype=auto runs
    assert 0 < spec.default_mbu <= 1  # a one-row product's share of the streaming read rate
    formats = dict(spec.mbu_by_weights)
    assert set(formats) == {"bf16", "int8", "int4"}  # each served by its own CPU kernel
    assert all(0 < v <= 1 for v in formats.values())
    assert spec.mbu_for("int4") == formats["int4"] and spec.mbu_for("fp8") == spec.default_mbu
    assert measure_local(bandwidth_bytes=32 << 20, max_matmul_n=256) is spec


def test_the_default_mbu_follows_the_weight_format():
    """A measured per-format MBU is what the comparison plans with, unless one is given."""
    from dataclasses import replace

    from turbollm.plan.setup import Precision
    spec = replace(FAKE_CPU, mbu_by_weights=(("int4", 0.3),))
    int4 = Precision(weights="int4", dtype="bf16", kv_dtype="bf16", group_size=32)
    fast = lambda p, d: EngineTiming(0.1, 0.01)  # noqa: E731
    cmp = compare_with_engine(fast, "smollm2-135m", spec, int4, out=None)
    assert cmp.setup.efficiency.mbu == 0.3
    cmp = compare_with_engine(fast, "smollm2-135m", spec, out=None)  # bf16 weights
    assert cmp.setup.efficiency.mbu == 0.8


def test_bf16_without_bf16_math_is_planned_as_storage_with_fp32_compute():
    from turbollm.plan.hardware import CATALOG
    from turbollm.plan.setup import Precision
    no_bf16_math = GPUSpec("avx2-cpu", memory_gb=16, bandwidth_gbps=20,
                           tflops={"fp32": 0.15, "bf16": 0.001}, interconnect_gbps=0)
    bf16 = Precision(weights="bf16", dtype="bf16", kv_dtype="bf16")
    assert bf16.compute_dtype(no_bf16_math) == "fp32"
    assert bf16.compute_dtype(FAKE_CPU) == "bf16"
    assert bf16.compute_dtype(CATALOG["A100-80GB"]) == "bf16"


def test_compare_with_engine_puts_prediction_next_to_measurement():
    seen = []

    def fake_measure(prompt_len, decode_tokens):
        seen.append((prompt_len, decode_tokens))
        return EngineTiming(prefill_s=0.2, decode_s_per_token=0.02)

    lines = []
    cmp = compare_with_engine(fake_measure, "SmolLM2-135M", FAKE_CPU, prompt_len=512,
                              decode_tokens=16, out=lines.append)
    assert seen == [(512, 16)]
    pre, dec = predict_batch1(cmp.setup, 512, 16)
    assert [r.predicted_s for r in cmp.rows] == [pre, dec]
    assert [r.measured_s for r in cmp.rows] == [0.2, 0.02]
    # the bundled 135M model at batch 1 on a 20 GB/s machine: ~270 MB of bf16 weights
    assert dec == pytest.approx(0.017, rel=0.1)
    text = lines[0]
    assert "prefill 512 tokens" in text and "decode per token" in text and "within 30%" in text


def test_comparison_flags_predictions_off_by_more_than_the_tolerance():
    def exact(prompt_len, decode_tokens):
        return EngineTiming(*predict_batch1(setup, prompt_len, decode_tokens))

    setup = compare_with_engine(lambda p, d: EngineTiming(1, 1), hardware=FAKE_CPU,
                                out=None).setup
    assert compare_with_engine(exact, hardware=FAKE_CPU, out=None).ok
    slow = compare_with_engine(lambda p, d: EngineTiming(10.0, 1.0), hardware=FAKE_CPU, out=None)
    assert not slow.ok and all(r.error < -0.3 for r in slow.rows)


def test_time_generate_separates_prefill_from_decode():
    calls = []

    def fake_generate(prompt_ids, max_tokens):
        calls.append((len(prompt_ids), max_tokens))
        time.sleep(0.01 + 0.002 * (max_tokens - 1))  # 10 ms prefill, 2 ms per further token

    timing = time_generate(fake_generate, vocab_size=100, repeats=2)(8, 5)
    assert calls[:2] == [(8, 2), (8, 2)] and (8, 1) in calls and (8, 6) in calls
    assert timing.prefill_s == pytest.approx(0.01, abs=0.008)
    assert timing.decode_s_per_token == pytest.approx(0.002, abs=0.0015)


def test_time_generate_sends_a_fresh_prompt_every_call():
    prompts = []
    time_generate(lambda ids, n: prompts.append(tuple(ids)), vocab_size=1000, repeats=2)(16, 4)
    assert len(prompts) == 6 and len(set(prompts)) == 6  # a prefix cache must not hit


def test_overhead_is_measured_on_a_same_depth_model_without_weights():
    """The planner's per-forward overhead: the decode step of a model as deep as the planned
    one but with almost no weights (what the roofline of weights and KV does not see)."""
    from turbollm.plan.models import load_model
    from turbollm.plan.validate import measure_overhead, same_depth_config

    _, arch = load_model("smollm2-135m")
    cfg = same_depth_config(arch)
    assert cfg["num_hidden_layers"] == arch.num_hidden_layers == 30
    assert cfg["hidden_size"] * cfg["vocab_size"] < 1e-3 * arch.num_parameters()
    overhead = measure_overhead(arch, {"dtype": "float32", "num_threads": 2}, repeats=3)
    assert 0 < overhead < 0.5

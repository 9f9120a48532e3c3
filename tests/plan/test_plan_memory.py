"""Memory: weight bytes per format, KV per token (the engine's function), fit, max batch."""
import pytest

from turbollm.plan.hardware import CATALOG
from turbollm.plan.memory import (kv_bytes_per_token, linear_shapes, matrix_bytes,
                                  memory_plan, weight_bytes)
from turbollm.plan.models import PRESETS, load_model
from turbollm.plan.setup import Precision, Setup, Workload
from turbollm.sizing import kv_cache_bytes_per_token

_, L70 = load_model("Llama-2-70B")
H100 = CATALOG["H100-SXM"]


def test_llama2_70b_bf16_kv_is_exactly_320_kib_per_token():
    # 2 (K and V) x 80 layers x 8 KV heads x 128 dims x 2 bytes
    assert kv_bytes_per_token(L70, "bf16") == 2 * 80 * 8 * 128 * 2 == 327_680
    # the planner's number is the engine's sizing function's number
    assert kv_bytes_per_token(L70, "bf16") == kv_cache_bytes_per_token(L70, "bf16")
    assert kv_bytes_per_token(L70, "fp8") == 163_840
    assert kv_bytes_per_token(L70, "int8") == 2 * 80 * 8 * (128 + 2)  # + fp16 scale per head


def test_kv_heads_split_over_gpus_and_replicate_beyond_their_count():
    assert kv_bytes_per_token(L70, "bf16", tp=2) == 327_680 // 2
    assert kv_bytes_per_token(L70, "bf16", tp=8) == 327_680 // 8
    assert kv_bytes_per_token(L70, "bf16", tp=16) == 327_680 // 8  # 8 heads, 16 GPUs
    _, f7 = load_model("Falcon-7B")  # multi-query: the one KV head is on every GPU
    assert kv_bytes_per_token(f7, "bf16", tp=2) == kv_bytes_per_token(f7, "bf16")


def test_llama2_70b_bf16_weights_are_about_138_gb():
    wb = weight_bytes(L70, Precision())
    assert 137.5e9 <= wb.total <= 140e9  # 68.98 B params x 2 bytes = 137.95 GB
    assert wb.total == 2 * L70.num_parameters()  # bf16: 2 bytes for every parameter


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_linear_shapes_match_the_parameter_count(name):
    _, arch = load_model(name)
    assert sum(i * o for i, o in linear_shapes(arch)) == arch.linear_params_per_layer()


def test_quantized_matrix_bytes_include_scales():
    # 4096 x 4096: int4 packs two per byte, + (scale, zero) fp16 per group of 128 inputs
    assert matrix_bytes(4096, 4096, "int4", 128) == 4096 * 4096 / 2 + 4096 * 32 * 4
    assert matrix_bytes(4096, 4096, "int4", 32) == 4096 * 4096 / 2 + 4096 * 128 * 4
    # int8: one fp16 scale per output channel
    assert matrix_bytes(4096, 11008, "int8") == 4096 * 11008 + 11008 * 2
    assert matrix_bytes(10, 20, "bf16") == 400 and matrix_bytes(10, 20, "fp32") == 800


def test_int4_shrinks_linear_weights_to_about_a_quarter():
    bf16 = weight_bytes(L70, Precision())
    int4 = weight_bytes(L70, Precision(weights="int4"))
    int8 = weight_bytes(L70, Precision(weights="int8"))
    # 4.25 bits per weight at group 128 vs 16 bits
    assert int4.linear / bf16.linear == pytest.approx(4.25 / 16, rel=1e-3)
    assert int4.total < int8.total < bf16.total
    assert int4.embedding == bf16.embedding  # embeddings stay in the activation dtype


def test_llama2_70b_bf16_does_not_fit_one_80gb_gpu_and_fits_two():
    w = Workload(512, 313, 1)
    one = memory_plan(Setup(L70, H100, 1), w)
    two = memory_plan(Setup(L70, H100, 2), w)
    assert not one.fits_weights and not one.fits and one.max_batch == 0
    assert two.fits and two.max_batch >= 1
    assert two.weights_per_gpu == pytest.approx(one.weights_per_gpu / 2, rel=1e-4)
    a100 = CATALOG["A100-80GB"]
    assert not memory_plan(Setup(L70, a100, 1), w).fits
    assert memory_plan(Setup(L70, a100, 2), w).fits


def test_max_batch_is_what_the_kv_budget_holds():
    s = Setup(L70, H100, 4)
    m = memory_plan(s, Workload(1000, 1000, 1))
    assert m.max_batch == int(m.kv_budget_per_gpu // (2000 * m.kv_per_token_per_gpu))
    longer = memory_plan(s, Workload(1000, 1000, 1), context_len=8000)
    assert longer.max_batch < m.max_batch
    too_big = memory_plan(s, Workload(1000, 1000, m.max_batch + 1))
    assert not too_big.fits and too_big.fits_weights
    assert memory_plan(s, Workload(1000, 1000, m.max_batch)).fits

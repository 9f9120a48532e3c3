"""int4 group-wise linear layers against their dequantize-then-matmul reference."""
import pytest
import torch

from turbollm.layers.linear import MergedLinear, QKVLinear, ReplicatedLinear
from turbollm.quantization import kernels, native
from turbollm.quantization.int4 import (dequantize_int4, install_int4, install_int4_minform,
                                        quantize_int4_rtn)


def seen_by_kernel(x, group_size):
    """x as the kernel computes with it: a single row is rounded to int16 blocks by default."""
    return kernels.int16_activations(x) if kernels.rounds_activations(x, group_size) else x


def _layer(kind, bias):
    torch.manual_seed(0)
    layer = {"qkv": lambda: QKVLinear(576, 576, 192, bias=bias),
             "merged": lambda: MergedLinear(576, [1536, 1536], bias=bias),
             "down": lambda: ReplicatedLinear(1536, 576, bias=bias)}[kind]()
    torch.nn.init.normal_(layer.weight, std=0.05)
    if bias:
        torch.nn.init.normal_(layer.bias)
    return layer


def test_rtn_roundtrip_error_is_within_half_a_step():
    w = torch.randn(64, 256)
    q, s, z = quantize_int4_rtn(w, 64)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert torch.equal(z, z.round())  # RTN zero points are integers
    err = (dequantize_int4(q, s, z, 64) - w).abs().reshape(64, 4, 64)
    # Scales are rounded to fp16 (relative 2^-11), which moves grid point q by up to 15 of that.
    assert bool((err <= s[..., None] * (0.5 + 15 * 2 ** -11) + 1e-6).all())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("kind,bias", [("qkv", True), ("merged", False), ("down", False)])
@pytest.mark.parametrize("rows", [1, 3, 24, 40, 56, 64, 100])
def test_int4_layer_matches_reference(kind, bias, group_size, rows):
    layer = _layer(kind, bias)
    q, s, z = quantize_int4_rtn(layer.weight, group_size)
    ref_w = dequantize_int4(q, s, z, group_size)
    bias_t = None if layer.bias is None else layer.bias.clone()
    install_int4(layer, q, s, z, group_size)
    assert layer.weight is None and layer.quant_method.name == "int4"
    x = torch.randn(rows, layer.in_features)
    ref = torch.nn.functional.linear(seen_by_kernel(x, group_size), ref_w, bias_t)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)


def test_fractional_zeros_and_minform_are_exact():
    """AWQ/GPTQ/GGUF hand over fractional zeros or (scale, min); both serve exactly."""
    layer = _layer("down", False)
    torch.manual_seed(1)
    q = torch.randint(0, 16, (576, 1536), dtype=torch.uint8)
    s = (torch.rand(576, 48) * 0.01).half().float()  # kernels keep fp16 scales and zeros
    z = (torch.rand(576, 48) * 15).half().float()  # fractional
    ref_w = dequantize_int4(q, s, z, 32)
    install_int4(layer, q, s, z, 32)
    q2, s2, z2 = layer.quant_method.canonical(layer)
    assert torch.equal(q2, q)
    assert torch.equal(z2, z) and torch.equal(s2, s)
    x = torch.randn(2, 1536)
    torch.testing.assert_close(layer(x), x @ ref_w.t(), rtol=1e-4, atol=1e-4)
    other = _layer("down", False)
    s[0, 0] = 0.0  # a constant group (GGUF Q4_1 allows d = 0)
    mins = (-z * s).half().float()
    install_int4_minform(other, q, s, mins, 32)
    ref_w = q.float().reshape(576, 48, 32) * s[..., None] + mins[..., None]
    torch.testing.assert_close(other(x), x @ ref_w.reshape(576, 1536).t(), rtol=1e-4, atol=1e-4)


def test_torch_fallback_matches(monkeypatch):
    """Without the C library (no AVX2 or no compiler) torch's kernels serve the same layer."""
    layer = _layer("qkv", True)
    q, s, z = quantize_int4_rtn(layer.weight, 32)
    ref_w, bias_t = dequantize_int4(q, s, z, 32), layer.bias.clone()
    install_int4(layer, q, s, z, 32)
    monkeypatch.setattr(native, "lib", lambda: None)
    for rows in (1, 4):
        x = torch.randn(rows, 576)
        ref = torch.nn.functional.linear(x, ref_w, bias_t)
        # the one-row torch kernel takes bf16 activations
        torch.testing.assert_close(layer(x), ref, rtol=2e-2, atol=2e-2)


def test_bad_install_is_refused():
    layer = _layer("down", False)
    q, s, z = quantize_int4_rtn(torch.randn(576, 1536), 32)
    with pytest.raises(ValueError, match="group size"):
        install_int4(layer, q, s[:, :32], z[:, :32], 48)
    with pytest.raises(ValueError, match="qweight shape"):
        install_int4(layer, q[:, :512], s, z, 32)


@pytest.mark.parametrize("group_size,limit", [(128, 0.3), (64, 0.3), (32, 0.32)])
def test_weight_bytes_vs_bf16(group_size, limit):
    """0.5 byte per weight + fp16 scale and zero per group: 0.27x / 0.28x / 0.31x of bf16."""
    layer = _layer("down", False)
    bf16 = layer.weight.numel() * 2
    install_int4(layer, *quantize_int4_rtn(layer.weight, group_size), group_size)
    assert layer.quant_method.weight_bytes(layer) <= limit * bf16


def test_ragged_last_group():
    """576 input columns in groups of 128: four full groups and one of 64."""
    layer = _layer("qkv", False)
    q, s, z = quantize_int4_rtn(layer.weight, 128)
    assert s.shape == (960, 5)
    ref_w = dequantize_int4(q, s, z, 128)
    assert (ref_w - layer.weight).abs().max() <= s.max() / 2 + 1e-6
    install_int4(layer, q, s, z, 128)
    x = torch.randn(2, 576)
    torch.testing.assert_close(layer(x), x @ ref_w.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group_size", [32, 96, 128])
def test_one_row_int16_activations_and_the_exact_switch(group_size, monkeypatch):
    """A single row is rounded to int16 per 32 columns (integer dot products); the rounding is
    the only difference from dequantize-then-matmul, and exact_activations() turns it off."""
    if native.lib() is None:
        pytest.skip("no C kernels here: the torch fallback is tested above")
    layer = _layer("down", False)
    q, s, z = quantize_int4_rtn(layer.weight, group_size)
    ref_w = dequantize_int4(q, s, z, group_size)
    install_int4(layer, q, s, z, group_size)
    x = torch.randn(1, 1536)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    assert kernels.rounds_activations(x, group_size)
    fast = layer(x)
    torch.testing.assert_close(fast, kernels.int16_activations(x) @ ref_w.t(), rtol=1e-4,
                               atol=1e-4)
    exact = x @ ref_w.t()
    assert (fast - exact).norm() / exact.norm() < 1e-4  # int16 rounding of x
    monkeypatch.setattr(kernels, "_int16_activations", True)
    kernels.exact_activations(True)
    try:
        assert not kernels.rounds_activations(x, group_size)
        torch.testing.assert_close(layer(x), exact, rtol=1e-4, atol=1e-4)
    finally:
        kernels.exact_activations(False)


def test_kernel_library_builds_here():
    """The CI machine has gcc and AVX2: the fast path must really be the C kernel."""
    if "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("CPU without AVX2: the torch kernels serve")
    assert native.lib() is not None
    assert kernels.MAX_ROWS_PACKED["int4"] >= 1


@pytest.mark.parametrize("group_size,k", [(32, 576), (128, 576), (96, 576), (96, 1536), (64, 1536)])
@pytest.mark.parametrize("n", [576, 7])  # 7: a tail of weight rows below the kernel's 4
@pytest.mark.parametrize("min_form", [False, True])  # True: GGUF Q4_1's (scale, min)
@pytest.mark.parametrize("rows", [2, 3, kernels.MAX_ROWS_A16])  # 2: the few-rows GEMV (G 32)
def test_one_row_equals_its_row_in_a_batch_bit_for_bit(group_size, k, n, min_form, rows):
    """Speculative verification (several rows) must reproduce plain decoding (one row): every
    output value is summed in the same order whatever the row count."""
    if native.lib() is None:
        pytest.skip("no C kernels here")
    torch.manual_seed(3)
    q, s, z = quantize_int4_rtn(torch.randn(n, k) * 0.05, group_size)
    if min_form:
        state = kernels.int4_pack_minform(q, s, -z * s, group_size)
    else:
        state = kernels.int4_pack(q, s, z, group_size)
    x = torch.randn(rows, k)
    batch = kernels.int4_linear(x, state)
    for m in sorted({0, rows // 2, rows - 1}):
        assert torch.equal(kernels.int4_linear(x[m:m + 1], state)[0], batch[m])


def test_the_int16_kernel_takes_any_row_count_in_pieces():
    """q4_gemm_a16 works through more rows than one call's tile table (64) in pieces of 64:
    every row still gets the bits it gets alone."""
    if native.lib() is None:
        pytest.skip("no C kernels here")
    torch.manual_seed(4)
    n, k, g, M = 40, 576, 32, 70
    q, s, z = quantize_int4_rtn(torch.randn(n, k) * 0.05, g)
    state = kernels.int4_pack(q, s, z, g)
    x, y = torch.randn(M, k), torch.empty(M, n)
    args = (state.packed.data_ptr(), state.scales.data_ptr(), state.offsets.data_ptr(),
            int(state.zero_form))
    native.lib().q4_gemm_a16(x.data_ptr(), M, *args, y.data_ptr(), n, k, g)
    for m in (0, 63, 64, 69):
        one = torch.empty(1, n)
        native.lib().q4_gemm_a16(x[m].data_ptr(), 1, *args, one.data_ptr(), n, k, g)
        assert torch.equal(one[0], y[m])

"""int8 per-channel (and per-group, for GGUF Q8_0) linear layers against their reference."""
import pytest
import torch

from turbollm.layers.linear import MergedLinear, QKVLinear, ReplicatedLinear
from turbollm.quantization import kernels, native
from turbollm.quantization.int8 import dequantize_int8, install_int8, quantize_int8


def seen_by_kernel(x, group_size):
    """x as the kernel computes with it: a single row is rounded to int16 blocks by default."""
    return (kernels.int16_activations(x) if kernels.rounds_activations(x, group_size, "int8")
            else x)


def _layer(kind, bias):
    torch.manual_seed(0)
    layer = {"qkv": lambda: QKVLinear(576, 576, 192, bias=bias),
             "merged": lambda: MergedLinear(576, [1536, 1536], bias=bias),
             "head": lambda: ReplicatedLinear(576, 4096, bias=bias)}[kind]()
    torch.nn.init.normal_(layer.weight, std=0.05)
    if bias:
        torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("kind,bias", [("qkv", True), ("merged", False), ("head", False)])
@pytest.mark.parametrize("rows", [1, 5, 24, 50, 64, 100])
def test_int8_layer_matches_reference(kind, bias, rows):
    layer = _layer(kind, bias)
    q, s = quantize_int8(layer.weight)
    assert q.dtype == torch.int8 and s.shape == (layer.out_features,)
    ref_w = dequantize_int8(q, s)
    assert (ref_w - layer.weight).abs().max() <= s.max() / 2 + 1e-6
    bias_t = None if layer.bias is None else layer.bias.clone()
    install_int8(layer, q, s)
    x = torch.randn(rows, layer.in_features)
    ref = torch.nn.functional.linear(seen_by_kernel(x, layer.in_features), ref_w, bias_t)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 7, 40])
def test_group_scales_match_reference(rows):
    layer = _layer("qkv", False)
    torch.manual_seed(2)
    q = torch.randint(-127, 128, (960, 576), dtype=torch.int8)
    s = torch.rand(960, 18) * 0.01
    install_int8(layer, q, s, group_size=32)
    ref_w = (q.float().reshape(960, 18, 32) * s[..., None]).reshape(960, 576)
    x = torch.randn(rows, 576)
    torch.testing.assert_close(layer(x), seen_by_kernel(x, 32) @ ref_w.t(), rtol=1e-4,
                               atol=1e-4)


def test_torch_fallback_matches(monkeypatch):
    layer = _layer("merged", False)
    q, s = quantize_int8(layer.weight)
    ref_w = dequantize_int8(q, s)
    install_int8(layer, q, s)
    monkeypatch.setattr(native, "lib", lambda: None)
    for rows in (1, 3):
        x = torch.randn(rows, 576)
        torch.testing.assert_close(layer(x), x @ ref_w.t(), rtol=2e-2, atol=2e-2)


def test_bad_install_is_refused():
    layer = _layer("qkv", False)
    q, s = quantize_int8(torch.randn(960, 576))
    with pytest.raises(ValueError, match="int8"):
        install_int8(layer, q.float(), s)
    with pytest.raises(ValueError, match="scales"):
        install_int8(layer, q, s[:10])


@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("n", [4096, 6])
@pytest.mark.parametrize("rows", [2, kernels.MAX_ROWS_A16])  # 2: the few-rows GEMV (G 32)
def test_one_row_equals_its_row_in_a_batch_bit_for_bit(group_size, n, rows):
    """As for int4: one row and the same row among several give the same bits."""
    if native.lib() is None:
        pytest.skip("no C kernels here")
    torch.manual_seed(4)
    q, s = quantize_int8(torch.randn(n, 576))
    state = kernels.int8_pack(q, s.reshape(n, 1).expand(n, 576 // (group_size or 576)),
                              group_size)
    x = torch.randn(rows, 576)
    batch = kernels.int8_linear(x, state)
    for m in (0, rows - 1):
        assert torch.equal(kernels.int8_linear(x[m:m + 1], state)[0], batch[m])

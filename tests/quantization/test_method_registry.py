"""The quantization-method interface: every registered method implements it, and a new method
is one class — registered, it quantizes a model at load through the same path as int8/int4."""
from __future__ import annotations

import pytest
import torch

from turbollm.layers.linear import ReplicatedLinear, UnquantizedLinearMethod
from turbollm.layers.quant_method import QuantMethod
from turbollm.quantization import registry
from turbollm.quantization.methods import get_method
from turbollm.quantization.apply import quantize_model


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_built_in_methods_quantize_and_load_through_the_interface(name):
    cls = get_method(name)
    assert issubclass(cls, QuantMethod) and cls.name == name
    dense = ReplicatedLinear(64, 32, dtype=torch.float32)
    torch.nn.init.normal_(dense.weight)
    x = torch.randn(3, 64)
    ref = x @ dense.weight.T
    made = ReplicatedLinear(64, 32, dtype=torch.float32)
    made.weight.data.copy_(dense.weight)
    cls.create_weights(made, 32)
    assert made.quant_method.name == name and made.weight is None
    # int4's 16 levels per group are the coarsest: a few % of the output's norm
    assert (made(x) - ref).norm() / ref.norm() < 0.1
    loaded = ReplicatedLinear(64, 32, dtype=torch.float32)
    cls.load(loaded, *made.quant_method.canonical(made),
             *([32] if name == "int4" else []))
    assert torch.equal(loaded(x), made(x))
    assert loaded.quant_method.weight_bytes(loaded) < 64 * 32 * 4


class SignMethod(QuantMethod):
    """A toy one-bit method: w = sign(w) * mean |w| per row."""

    name = "sign_test"

    @classmethod
    def create_weights(cls, layer, group_size):
        w = layer.weight.data
        layer.sign_scale = w.abs().mean(1, keepdim=True)
        layer.sign = torch.sign(w)
        del layer.weight
        layer.weight = None
        layer.quant_method = cls()

    def apply(self, layer, x):
        return x @ (layer.sign * layer.sign_scale).T

    def weight_bytes(self, layer):
        return layer.sign.numel() // 8


def test_a_new_method_is_one_registered_class(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    registry.register(SignMethod)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(SignMethod)
    model = torch.nn.Module()
    model.proj = ReplicatedLinear(16, 8, dtype=torch.float32)
    torch.nn.init.normal_(model.proj.weight)
    expect = torch.sign(model.proj.weight) * model.proj.weight.abs().mean(1, keepdim=True)
    quantize_model(model, "sign_test", progress=False)
    x = torch.randn(2, 16)
    assert model.proj.quant_method.name == "sign_test"
    assert torch.allclose(model.proj(x), x @ expect.T)


def test_unknown_methods_and_the_dense_default():
    with pytest.raises(ValueError, match="unknown quantization method"):
        get_method("int3")
    layer = ReplicatedLinear(8, 4, dtype=torch.float32)
    assert isinstance(layer.quant_method, UnquantizedLinearMethod)
    assert layer.quant_method.weight_bytes(layer) == 8 * 4 * 4

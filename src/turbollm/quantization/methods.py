"""Every built-in quantization method, looked up by name."""
from __future__ import annotations

from turbollm.layers.quant_method import QuantMethod
# importing a method's file registers it
from turbollm.quantization import fp8, int4, int8, sparse_method  # noqa: F401
from turbollm.quantization import registry


def get_method(name: str) -> type[QuantMethod]:
    """The registered method `name`."""
    methods = registry.METHODS
    if name not in methods:
        raise ValueError(f"unknown quantization method {name!r}; one of {sorted(methods)}")
    return methods[name]

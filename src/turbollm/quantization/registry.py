"""Quantization methods by name: each method file registers its QuantMethod class here
(look them up through quantization/methods.py, which imports every method file)."""
from __future__ import annotations

from turbollm.layers.quant_method import QuantMethod

METHODS: dict[str, type[QuantMethod]] = {}


def register(cls: type[QuantMethod]) -> type[QuantMethod]:
    """Class decorator: make a method available by its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"quantization method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls

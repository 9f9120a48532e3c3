"""The engine's greedy tokens on the bundled model are exactly those pinned before the
worker-line redesign (pinned_outputs.py), in every pinned configuration and compute path."""
from __future__ import annotations

import json

import pytest

from pinned_outputs import CONFIGS, FIXTURE, NEEDS_ISA, PATHS, generate, pin_key

from turbollm.native_build import supported_isas

PINNED = json.loads(FIXTURE.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_tokens_equal_the_pinned_ones(name, path):
    isa = NEEDS_ISA.get(path)
    if isa and isa not in supported_isas():
        pytest.skip(f"the {path} path needs the {isa} kernel variant (its CPU instructions)")
    assert generate(CONFIGS[name], path) == PINNED[pin_key(path)][name]


def test_the_pins_differ_between_configurations():
    """A pin that every configuration shares would not notice a switch that stopped working."""
    path = PINNED["fp32_math"]
    assert path["int4"] != path["fp32"]

"""Fixtures of the LoRA tests on the tiny random Llama: its HF model, its arch, an adapter."""
from __future__ import annotations

import json

import pytest
import torch

from lora_helpers import make_adapter
from turbollm.model_arch import ModelArch


@pytest.fixture(scope="session")
def tiny_hf(tiny_llama):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_arch(tiny_llama):
    return ModelArch.from_hf_config(json.loads((tiny_llama / "config.json").read_text()))


@pytest.fixture(scope="session")
def good_adapter(tiny_hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "adapter"
    make_adapter(tiny_hf, path, r=4, alpha=12, targets=["q_proj", "v_proj", "up_proj"])
    return path

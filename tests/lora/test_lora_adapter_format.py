"""PEFT adapter directories read by our own code (loader/peft_adapter.py), and the one-line
errors for what we cannot serve; on the tiny random Llama."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbollm import LLM, LoRARequest, SamplingParams
from turbollm.engine.errors import RequestValidationError
from turbollm.loader.peft_adapter import load_peft_adapter


def edited(src, dst, config=None, tensors=None):
    """A copy of an adapter dir with config keys changed and/or tensors replaced."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = tensors(load_file(str(dst / "adapter_model.safetensors")))
        save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def test_reads_peft_layout_and_folds_scaling(good_adapter, tiny_arch):
    ad = load_peft_adapter(good_adapter, tiny_arch)
    assert ad.rank == 4 and ad.scaling == pytest.approx(12 / 4)
    assert ad.target_modules == {"q_proj", "v_proj", "up_proj"}
    assert len(ad.weights) == 3 * tiny_arch.num_hidden_layers
    raw = load_file(str(good_adapter / "adapter_model.safetensors"))
    a, b = ad.weights[(1, "v_proj")]
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"
    torch.testing.assert_close(a, raw[key.format("A")])
    torch.testing.assert_close(b, raw[key.format("B")] * 3.0)  # B carries the scaling
    assert b.abs().max() > 0


def test_rslora_scaling(good_adapter, tmp_path, tiny_arch):
    path = edited(good_adapter, tmp_path / "rs", config={"use_rslora": True})
    assert load_peft_adapter(path, tiny_arch).scaling == pytest.approx(12 / math.sqrt(4))


def _drop_b(t):
    return {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k}


def _embedding(t):
    return {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}


def _bad_rank(t):
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_{}.weight"
    a, b = t[key.format("A")], t[key.format("B")]
    return {**t, key.format("A"): a[:3].contiguous(), key.format("B"): b[:, :3].contiguous()}


BAD = {
    "dora": (dict(config={"use_dora": True}), "DoRA"),
    "modules_to_save": (dict(config={"modules_to_save": ["lm_head"]}), "modules_to_save"),
    "embedding target": (dict(config={"target_modules": ["embed_tokens", "q_proj"]}),
                         "embed_tokens"),
    "lm_head target": (dict(config={"target_modules": ["lm_head"]}), "lm_head"),
    "alpha pattern": (dict(config={"alpha_pattern": {"q_proj": 3}}), "alpha_pattern"),
    "bias": (dict(config={"bias": "all"}), "bias"),
    "not lora": (dict(config={"peft_type": "IA3"}), "IA3"),
    "bad r": (dict(config={"r": 0}), "r must be"),
    "unpaired": (dict(tensors=_drop_b), "without its pair"),
    "embedding tensor": (dict(tensors=_embedding), "embedding adapters"),
    "rank differs from r": (dict(tensors=_bad_rank), "rank 3 but r = 4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsupported_adapters_fail_in_one_line(case, good_adapter, tmp_path, tiny_arch):
    kwargs, words = BAD[case]
    path = edited(good_adapter, tmp_path / "bad", **kwargs)
    with pytest.raises(ValueError) as err:
        load_peft_adapter(path, tiny_arch)
    msg = str(err.value)
    assert words in msg and str(path) in msg and "\n" not in msg, msg


def test_missing_pieces(good_adapter, tmp_path, tiny_arch):
    with pytest.raises(ValueError, match="not a directory"):
        load_peft_adapter(tmp_path / "nowhere", tiny_arch)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="adapter_config.json: missing"):
        load_peft_adapter(empty, tiny_arch)
    binary = edited(good_adapter, tmp_path / "bin")
    (binary / "adapter_model.safetensors").rename(binary / "adapter_model.bin")
    with pytest.raises(ValueError, match="safe_serialization"):
        load_peft_adapter(binary, tiny_arch)
    garbled = edited(good_adapter, tmp_path / "garbled")
    (garbled / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="unreadable safetensors"):
        load_peft_adapter(garbled, tiny_arch)


def test_adapter_of_another_model_is_refused(good_adapter, tiny_arch):
    wider = dataclasses.replace(tiny_arch, hidden_size=2 * tiny_arch.hidden_size,
                                head_dim=tiny_arch.head_dim)
    with pytest.raises(ValueError, match="another base model"):
        load_peft_adapter(good_adapter, wider)
    fewer = dataclasses.replace(tiny_arch, num_hidden_layers=1)
    with pytest.raises(ValueError, match="the model has 1 layers"):
        load_peft_adapter(good_adapter, fewer)


def test_engine_refuses_bad_adapter_per_request(good_adapter, tiny_llama, tmp_path):
    """A bad adapter fails its own generate() call with a one-line error, queues nothing,
    and the engine serves the next call."""
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="8MiB", enable_lora=True)
    bad = edited(good_adapter, tmp_path / "dora", config={"use_dora": True})
    sp = SamplingParams(max_tokens=3, temperature=0)
    with pytest.raises(RequestValidationError, match="DoRA") as err:
        llm.generate(["hello", "world"], sp,
                     lora_request=[None, LoRARequest("dora", 1, str(bad))])
    assert "\n" not in str(err.value) and "'dora'" in str(err.value)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["hello"], sp, lora_request=LoRARequest("good", 2, str(good_adapter)))
    assert len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="already 'good'"):  # one id, two adapters
        llm.generate(["hello"], sp, lora_request=LoRARequest("other", 2, str(bad)))


def test_engine_without_enable_lora_says_so(tiny_llama, good_adapter):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="8MiB")
    with pytest.raises(RequestValidationError, match="enable_lora"):
        llm.generate(["hi"], SamplingParams(max_tokens=1),
                     lora_request=LoRARequest("a", 1, str(good_adapter)))


def test_lora_request_validates():
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1, "/x")

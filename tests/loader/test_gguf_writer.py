"""Round trips through GGUF files we write ourselves: tiny random Llama / Qwen2 state dicts."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT, quants

from turbollm.loader.gguf import GGUFCheckpoint
from turbollm.loader.gguf_config import llama3_rope_scaling
from turbollm.loader.gguf_file import GGUFFile
from turbollm.loader.gguf_writer import llama3_rope_factors, write_llama_gguf
from turbollm.model_arch import ModelArch


def tiny_config(**over) -> dict:
    cfg = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False,
    )
    return cfg | over


def random_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random weights [out, in] for a Llama/Qwen2 config."""
    g = torch.Generator().manual_seed(seed)
    h, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if cfg["attention_bias"]:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def expected_after_storage(x: torch.Tensor, qtype: QT) -> torch.Tensor:
    """What a tensor reads back as after being stored as `qtype` (gguf-py's reference round trip)."""
    raw = quants.quantize(x.numpy(), qtype)
    return torch.from_numpy(quants.dequantize(raw, qtype).astype(np.float32)).reshape(x.shape)


def test_llama_round_trip_mixed_types(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    types = {
        "model.embed_tokens.weight": QT.Q8_0,
        "lm_head.weight": QT.F16,
        "model.layers.0.self_attn.q_proj.weight": QT.F32,  # exact: a wrong un-permutation shows
        "model.layers.0.self_attn.k_proj.weight": QT.F32,
        "model.layers.1.self_attn.q_proj.weight": QT.Q8_0,  # quantized rows permuted back
        "model.layers.1.self_attn.k_proj.weight": QT.F16,
        "model.layers.1.mlp.up_proj.weight": QT.BF16,
    }
    path = write_llama_gguf(tmp_path / "tiny.gguf", cfg, sd, ggml_type=QT.F16, overrides=types)
    ck = GGUFCheckpoint(path)
    assert ModelArch.from_hf_config(ck.hf_config) == ModelArch.from_hf_config(cfg)
    got = dict(ck.iter_tensors(torch.float32))
    assert list(got) == list(ck.hf_names()) and set(got) == set(sd)
    for name, x in sd.items():
        qtype = types.get(name, QT.F16 if x.dim() == 2 else QT.F32)
        assert ck.ggml_type(name) == qtype
        torch.testing.assert_close(got[name], expected_after_storage(x, qtype), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.weight"], sd["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=0)
    # the file itself holds q/k in llama.cpp's permuted order
    stored = GGUFFile(path).tensor_bytes("blk.0.attn_q.weight").view(np.float32)
    assert not np.array_equal(stored, sd["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_qwen2_round_trip_with_bias_and_tied_embeddings(tmp_path):
    cfg = tiny_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True, attention_bias=True)
    sd = random_state_dict(cfg, seed=1)
    path = write_llama_gguf(tmp_path / "qwen.gguf", cfg, sd, ggml_type=QT.F32)
    ck = GGUFCheckpoint(path)
    hf = ck.hf_config
    assert hf["model_type"] == "qwen2" and hf["tie_word_embeddings"] and hf["attention_bias"]
    assert ModelArch.from_hf_config(hf).attention_bias
    got = dict(ck.iter_tensors(torch.float32))
    assert set(got) == set(sd) and "lm_head.weight" not in got
    for name, x in sd.items():  # qwen2: no permutation anywhere, biases included
        torch.testing.assert_close(got[name], x, rtol=0, atol=0, msg=name)


def test_llama_q_bias_is_unpermuted(tmp_path):
    cfg = tiny_config(attention_bias=True, num_hidden_layers=1)
    sd = random_state_dict(cfg, seed=2)
    ck = GGUFCheckpoint(write_llama_gguf(tmp_path / "b.gguf", cfg, sd, ggml_type=QT.F32))
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias"):
        torch.testing.assert_close(ck.get_tensor(name), sd[name], rtol=0, atol=0)


def test_rope_scaling_round_trip(tmp_path):
    linear = {"rope_type": "linear", "factor": 4.0}
    cfg = tiny_config(num_hidden_layers=1, rope_scaling=linear)
    ck = GGUFCheckpoint(write_llama_gguf(tmp_path / "lin.gguf", cfg, random_state_dict(cfg)))
    assert ck.hf_config["rope_scaling"] == linear

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    cfg = tiny_config(num_hidden_layers=1, rope_scaling=llama3, rope_theta=500000.0)
    ck = GGUFCheckpoint(write_llama_gguf(tmp_path / "l3.gguf", cfg, random_state_dict(cfg)))
    assert ck.hf_config["rope_scaling"] == llama3
    assert "rope_freqs.weight" not in ck.hf_names()


def test_llama3_rope_fit_recovers_parameters():
    params = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
              "original_max_position_embeddings": 8192}
    factors = llama3_rope_factors(500000.0, 128, params)
    assert ((factors > 1.0) & (factors < 32.0)).sum() >= 2  # enough in-between points to fit
    assert llama3_rope_scaling(factors, 500000.0, 128, 8192) == params


def test_file_reader_matches_gguf_reader(tmp_path):
    """Our header parser against gguf-py's GGUFReader on assorted metadata types."""
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("a.str", "héllo")
    w.add_array("a.strs", ["x", "", "世界"])
    w.add_array("a.ints", [1, -2, 3])
    w.add_array("a.floats", [0.5, 1.5])
    w.add_bool("a.bool", True)
    w.add_uint64("a.u64", 2**40)
    w.add_int32("a.i32", -7)
    w.add_float32("a.f32", 0.25)
    w.add_float64("a.f64", 1e-300)
    w.add_tensor("t1", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("t2", quants.quantize(np.ones((3, 64), np.float32), QT.Q8_0), raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[key]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if key in ("a.f32", "a.floats", "a.f64"):
            assert got == pytest.approx(want, rel=1e-7), key
        else:
            assert got == want, key
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type and info.offset == int(t.data_offset)
        np.testing.assert_array_equal(ours.tensor_bytes(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
        assert info.shape == tuple(int(d) for d in reversed(t.shape))

"""GGUF Q4_1 / Q4_0 / Q8_0 linears served in their quantized form equal the dequantized model."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from turbollm import LLM
from turbollm.loader.gguf_writer import write_llama_gguf

CFG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
           rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
           attention_bias=False)


def _state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    h, inter, q, kv = 64, 128, 64, 32
    shapes = {"model.embed_tokens.weight": (256, h), "model.norm.weight": (h,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter)}
    sd = {n: torch.randn(s, generator=g) * (0.2 if len(s) == 2 else 1.0) for n, s in shapes.items()}
    for n in sd:
        if n.endswith("norm.weight"):
            sd[n] = 1.0 + 0.1 * sd[n]
    return sd


def _llm(path, tokenizer_dir, **kw):
    return LLM(str(path), tokenizer=str(tokenizer_dir), kv_cache_memory="8MiB", **kw)


def _methods(llm):
    return {n: m.quant_method.name for n, m in llm.engine.executor.worker.model.named_modules()
            if hasattr(m, "quant_method")}


@pytest.mark.parametrize("default,overrides,expect", [
    # Q4_1 everywhere, Q8_0 embedding (the bundled model's mix): int4 linears, int8 tied head
    (QT.Q4_1, {"model.embed_tokens.weight": QT.Q8_0},
     {"model.layers.0.self_attn.qkv_proj": "int4", "lm_head": "int8"}),
    # Q4_0 with a Q8_0 down_proj; q (Q4_0) with k (Q8_0) cannot share one fused form: dense
    (QT.Q4_0, {"model.layers.0.mlp.down_proj.weight": QT.Q8_0,
               "model.layers.1.self_attn.k_proj.weight": QT.Q8_0},
     {"model.layers.0.mlp.down_proj": "int8", "model.layers.0.mlp.gate_up_proj": "int4",
      "model.layers.1.self_attn.qkv_proj": "none", "lm_head": "int4"}),
    # Q4_0 and Q4_1 shards in one fused layer share the int4 (scale, min) form
    (QT.Q8_0, {"model.layers.0.self_attn.q_proj.weight": QT.Q4_0,
               "model.layers.0.self_attn.k_proj.weight": QT.Q4_1,
               "model.layers.0.self_attn.v_proj.weight": QT.Q4_0},
     {"model.layers.0.self_attn.qkv_proj": "int4", "model.layers.1.self_attn.qkv_proj": "int8"}),
])
def test_native_equals_dequantized(tmp_path, tiny_llama, default, overrides, expect):
    path = write_llama_gguf(tmp_path / "m.gguf", CFG, _state_dict(), ggml_type=default,
                            overrides=overrides)
    native = _llm(path, tiny_llama, dtype="float32")
    methods = _methods(native)
    for name, method in expect.items():
        assert methods[name] == method, name
    dense = _llm(path, tiny_llama, dtype="float32", quantization="none")
    assert set(_methods(dense).values()) == {"none"}
    ids = list(range(3, 60))
    ref = dense.score_logits(ids)
    torch.testing.assert_close(native.score_logits(ids), ref, rtol=1e-4, atol=1e-4)


def test_gguf_quantization_needs_a_gguf_file(tiny_llama):
    with pytest.raises(ValueError, match="GGUF"):
        LLM(str(tiny_llama), quantization="gguf", kv_cache_memory="8MiB")


@pytest.mark.slow
def test_bundled_q4_1_native_equals_dequantized(bundled_gguf):
    """The bundled SmolLM2 (Q4_1 linears, Q8_0 tied embedding) served natively gives the
    logits of its dequantized fp32 model, and holds its weights at ~0.3x bf16."""
    from turbollm.quantization.weight_bytes import model_weight_bytes
    ids = list(range(1000, 1064))
    native = LLM(str(bundled_gguf), dtype="float32", kv_cache_memory="16MiB")
    methods = set(_methods(native).values())
    assert methods == {"int4", "int8"}
    got = native.score_logits(ids)
    sizes = model_weight_bytes(native.engine.executor.worker.model)
    del native
    dense = LLM(str(bundled_gguf), dtype="float32", quantization="none", kv_cache_memory="16MiB")
    torch.testing.assert_close(got, dense.score_logits(ids), rtol=1e-3, atol=1e-3)
    # decoder linears: Q4_1 is 20 bytes per 32 weights, 0.3125x bf16
    assert sizes["linear"] <= 0.3125 * sizes["linear_bf16"] + 1e3
    assert sizes["lm_head"] < 0.6 * 49152 * 576 * 2  # int8 head from the Q8_0 embedding

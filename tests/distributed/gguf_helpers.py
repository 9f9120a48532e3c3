"""A tiny GGUF checkpoint for the tensor-parallel tests."""
from __future__ import annotations

import torch


def tiny_gguf(path):
    """A random 2-layer Llama as GGUF, Q4_1 linears and a Q8_0 tied embedding (the bundled
    model's mix), without a tokenizer: pass the tiny model's."""
    from gguf import GGMLQuantizationType as QT

    from turbollm.loader.gguf_writer import write_llama_gguf
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(256, 64, generator=g) * 0.2,
          "model.norm.weight": torch.ones(64)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": torch.ones(64),
               p + "post_attention_layernorm.weight": torch.ones(64)}
        for name, shape in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
                            ("self_attn.v_proj", (32, 64)), ("self_attn.o_proj", (64, 64)),
                            ("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)),
                            ("mlp.down_proj", (64, 128))):
            sd[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.2
    return write_llama_gguf(path, cfg, sd, ggml_type=QT.Q4_1,
                            overrides={"model.embed_tokens.weight": QT.Q8_0})

"""int8 / fp8 KV cache: quantize on write, dequantize on read, sized at ~half of bf16."""
from __future__ import annotations

import pytest
import torch

from turbollm import LLM, SamplingParams
from turbollm.attention.backend import AttentionMetadata
from turbollm.attention.kv_quant import allocate_quant_kv_cache
from turbollm.attention.torch_sdpa import TorchAttentionBackend
from turbollm.model_arch import ModelArch
from turbollm.sizing import kv_cache_bytes_per_token


@pytest.mark.parametrize("kind", ["int8", "fp8_e4m3"])
def test_write_read_roundtrip(kind):
    torch.manual_seed(0)
    cache = allocate_quant_kv_cache(1, 4, 8, 3, 64, kind, "cpu").layer_views()[0][0]
    x = torch.randn(10, 3, 64) * torch.rand(10, 3, 1) * 5  # per token/head magnitudes differ
    slots = torch.tensor([0, 1, 2, 9, 10, 17, 30, 31, 5, 6])
    cache.write(x, slots)
    got = cache.read(torch.arange(4), torch.float32).reshape(32, 3, 64)[slots]
    if kind == "int8":  # error at most half a step of that token's own scale
        step = x.abs().amax(-1, keepdim=True) / 127
        assert bool(((got - x).abs() <= step / 2 + 1e-3 * step).all())
    else:  # e4m3: 3 mantissa bits
        assert bool(((got - x).abs() <= x.abs() / 16 + 1e-2).all())
    untouched = cache.read(torch.arange(4), torch.float32).reshape(32, 3, 64)[3]
    assert bool((untouched == 0).all())


def test_attention_on_int8_cache_matches_dequantized_reference():
    """Decode and chunked prefill on an int8 cache equal attention on its dequantized values."""
    torch.manual_seed(1)
    nb, bs, kvh, h, d = 6, 4, 2, 4, 16
    quant = allocate_quant_kv_cache(1, nb, bs, kvh, d, "int8", "cpu").layer_views()[0]
    ctx = torch.randn(2, 20, kvh, d)  # K and V of 20 earlier tokens of one sequence
    slots = torch.arange(20)
    quant[0].write(ctx[0], slots)
    quant[1].write(ctx[1], slots)
    blocks = torch.arange(nb)
    backend = TorchAttentionBackend()

    def check(q, k, v, meta):
        got = backend.forward(q, k, v, quant[0], quant[1], meta, 0.25)
        # the reference: a plain cache holding the dequantized values, new tokens included
        dense = [c.read(blocks, torch.float32).clone() for c in quant]
        flat = [c.reshape(-1, kvh, d) for c in dense]
        kd, vd = flat[0][meta.slot_mapping], flat[1][meta.slot_mapping]
        meta.derived.clear()
        ref = backend.forward(q, kd, vd, dense[0], dense[1], meta, 0.25)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    q, k, v = torch.randn(3, h, d), torch.randn(3, kvh, d), torch.randn(3, kvh, d)
    # three new tokens at positions 20..22: a chunked prefill reading 20 cached tokens
    check(q, k, v, AttentionMetadata(slot_mapping=torch.arange(20, 23), num_decodes=0,
                                     decode_block_tables=None, decode_seq_lens=None,
                                     prefills=[(0, 3, 23, blocks)], block_size=bs))
    # one decode step reading all 24 tokens back
    check(q[:1], k[:1], v[:1], AttentionMetadata(
        slot_mapping=torch.tensor([23]), num_decodes=1, decode_block_tables=blocks[None],
        decode_seq_lens=torch.tensor([24]), prefills=[], block_size=bs))


def test_sizing_counts_values_and_scales():
    arch = ModelArch.from_hf_config(dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    bf16 = kv_cache_bytes_per_token(arch, torch.bfloat16)
    int8 = kv_cache_bytes_per_token(arch, "int8")
    assert int8 == 2 * 30 * 3 * (64 + 2)
    assert bf16 / int8 > 1.9  # ~2x the tokens in the same budget


def test_engine_holds_twice_the_tokens_and_generates(tiny_llama):
    bf16 = LLM(str(tiny_llama), dtype="bfloat16", kv_cache_memory="4MiB")
    int8 = LLM(str(tiny_llama), dtype="bfloat16", kv_cache_memory="4MiB", kv_cache_dtype="int8")
    arch, bs = int8.engine.arch, int8.engine.config.cache.block_size
    # the engine sizes with the shared function: values + one fp16 scale per token and head
    assert int8.engine.num_kv_blocks == 4 * 2**20 // (bs * kv_cache_bytes_per_token(arch, "int8"))
    d = arch.head_dim
    assert int8.engine.num_kv_blocks >= 0.99 * (2 * d / (d + 2)) * bf16.engine.num_kv_blocks
    params = SamplingParams(max_tokens=8, temperature=0)
    prompt = [[5, 17, 300, 42, 7, 99, 1000, 3]]
    a = bf16.generate(prompt, params)[0].outputs[0].token_ids
    b = int8.generate(prompt, params)[0].outputs[0].token_ids
    assert len(b) == 8 and a[:2] == b[:2]  # a random tiny model: the first steps agree


def test_fp8_cache_generates(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="4MiB", kv_cache_dtype="fp8_e4m3")
    out = llm.generate([[5, 17, 300, 42]], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_fp16_cache_under_fp32_activations(tiny_llama):
    """--kv-cache-dtype float16 stores 2 bytes per value while the model computes in fp32:
    twice the blocks of 'auto' in the same budget, and the same greedy tokens at first."""
    fp32 = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="4MiB")
    fp16 = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="4MiB", kv_cache_dtype="float16")
    assert fp16.engine.executor.worker.runner.kv_views[0][0].dtype == torch.float16
    assert fp16.engine.num_kv_blocks == 2 * fp32.engine.num_kv_blocks
    params = SamplingParams(max_tokens=8, temperature=0)
    prompt = [[5, 17, 300, 42, 7, 99, 1000, 3]]
    a = fp32.generate(prompt, params)[0].outputs[0].token_ids
    b = fp16.generate(prompt, params)[0].outputs[0].token_ids
    assert len(b) == 8 and a[:4] == b[:4]

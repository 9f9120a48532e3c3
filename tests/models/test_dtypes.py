"""bf16 and fp16 run through the same code and stay close to fp32."""
import pytest
import torch

from turbollm import LLM
from turbollm.worker.model_loader import compute_dtype_for, resolve_dtype
from turbollm.model_arch import ModelArch

from test_llama_vs_hf import our_logits  # noqa: E402 (same directory)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_close_to_fp32(dtype, tiny_llama):
    ids = torch.randint(3, 49152, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = our_logits(LLM(str(tiny_llama), dtype="float32", kv_cache_memory="4MiB"), ids, [24])
    llm = LLM(str(tiny_llama), dtype=dtype, kv_cache_memory="4MiB")
    assert llm.engine.executor.worker.kv_cache.dtype == getattr(torch, dtype)
    got = our_logits(llm, ids, [16] + [1] * 8)
    assert got.dtype == torch.float32
    # 16-bit rounding of weights and activations: close, not equal; same top token mostly.
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_auto_dtype_rules(monkeypatch):
    arch = ModelArch(model_type="llama", hidden_size=8, intermediate_size=16,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     vocab_size=10, torch_dtype="float16")
    import turbollm.native_build as nb
    import turbollm.platform_info as pi
    assert resolve_dtype("auto", arch, "cpu") == torch.bfloat16
    assert resolve_dtype("auto", arch, "cuda") == torch.float16
    for isa in ("avx2", "avx512", "amx", None):  # with our C kernels, and without
        monkeypatch.setattr(nb, "selected_isa", lambda isa=isa: isa)
        for native_bf16 in (False, True):
            monkeypatch.setattr(pi, "cpu_has_native_bf16", lambda v=native_bf16: v)
            bf16_math = torch.bfloat16 if native_bf16 else torch.float32
            # auto: fp32 activations wherever the C kernels (which take them) run
            assert compute_dtype_for(torch.bfloat16, "cpu") == (torch.float32 if isa
                                                                else bf16_math)
            # asked for: bf16 math where the CPU has it, else bf16 storage with fp32 math
            assert compute_dtype_for(torch.bfloat16, "cpu", "bfloat16") == bf16_math
            assert compute_dtype_for(torch.float16, "cpu", "float16") == torch.float32
            assert compute_dtype_for(torch.bfloat16, "cuda") == torch.bfloat16
    arch.torch_dtype = "float32"
    assert resolve_dtype("auto", arch, "cuda") == torch.float32
    assert resolve_dtype("float16", arch, "cpu") == torch.float16


def test_bf16_storage_fp32_compute_layout(tiny_llama, monkeypatch):
    import turbollm.platform_info as pi
    monkeypatch.setattr(pi, "cpu_has_native_bf16", lambda: False)
    llm = LLM(str(tiny_llama), dtype="bfloat16", kv_cache_memory="4MiB")
    m = llm.engine.executor.worker.model
    assert m.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.model.norm.weight.dtype == torch.float32
    assert llm.engine.executor.worker.kv_cache.dtype == torch.bfloat16
    ids = torch.randint(3, 49152, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = our_logits(LLM(str(tiny_llama), dtype="float32", kv_cache_memory="4MiB"), ids, [12])
    got = our_logits(llm, ids, [8] + [1] * 4)  # multi-row (upcast) and one-row (bf16 GEMV)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()

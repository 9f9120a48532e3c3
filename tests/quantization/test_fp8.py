"""fp8 (e4m3) per-channel weights: format, both kernels against their references, and the model."""
from __future__ import annotations

import pytest
import torch

from turbollm.layers import native_ops
from turbollm.layers.linear import ReplicatedLinear
from turbollm.quantization import fp8
from turbollm.quantization.fp8 import (dequantize_fp8, install_fp8, quantize_fp8,
                                       quantize_rows_fp8)


def test_quantize_rounds_each_row_to_its_e4m3_grid():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64,)
    assert torch.equal(q.float().abs().amax(1), torch.full((64,), 448.0))  # each row's max fits
    err = (dequantize_fp8(q, s) - w).abs()
    # e4m3 keeps 3 mantissa bits: a value is off by at most half a step, 2^-4 of its binade
    assert bool((err <= w.abs() * 2 ** -4 + s[:, None] * 2 ** -9 + 1e-12).all())


def test_c_kernel_reads_every_e4m3_byte_exactly():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # all but the two NaNs: 254 values incl. subnormals
    q = codes[:248].view(torch.float8_e4m3fn).reshape(1, -1).repeat(4, 1).contiguous()
    y = native_ops.e4m3_linear(torch.eye(248), q, torch.ones(4))  # y[j, o] = q[o, j]
    assert torch.equal(y.t(), q.float())


@pytest.mark.parametrize("rows", [1, 3, 64, 129, 300])
def test_weight_only_kernel_matches_reference(rows):
    torch.manual_seed(rows)
    layer = ReplicatedLinear(576, 67, bias=True)
    torch.nn.init.normal_(layer.weight, std=0.05)
    torch.nn.init.normal_(layer.bias)
    q, s = quantize_fp8(layer.weight)
    ref_w, bias = dequantize_fp8(q, s), layer.bias.clone()
    install_fp8(layer, q, s)
    assert layer.weight is None and layer.quant_method.name == "fp8"
    x = torch.randn(rows, 576)
    assert fp8.fp8_kernel(x, layer.fp8_state) == "weight_only"  # no fp8 tensor cores on CPU
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, ref_w, bias),
                               rtol=1e-4, atol=1e-4)


def test_scaled_mm_kernel_matches_its_reference():
    """The Hopper path (per-token fp8 activations, torch._scaled_mm) run on CPU."""
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(5, 128) * torch.tensor([1e-3, 1.0, 10.0, 100.0, 0.1])[:, None]
    q, s = quantize_fp8(w)
    state = fp8.Fp8State(q, s)
    xq, xs = quantize_rows_fp8(x)
    assert torch.equal(xq.float().abs().amax(1), torch.full((5,), 448.0))
    ref = (xq.float() * xs) @ dequantize_fp8(q, s).t()
    y = fp8.fp8_scaled_linear(x, state)
    # bf16 output: relative 2^-8 of each row's magnitude
    tol = ref.abs().amax(1, keepdim=True) * 2 ** -7
    assert bool(((y - ref).abs() <= tol).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; the same function is "
                    "checked on CPU above")
@pytest.mark.parametrize("rows", [1, 2, 7, 64, 300])
def test_fp8_kernels_on_cuda_match_their_references(rows):
    """On a device with fp8 tensor cores: decode-sized inputs take the Triton kernels (x as it
    is, so they match the weight-only product), prefill-sized ones torch._scaled_mm (x rounded
    to fp8 per row, so it matches that rounding's product)."""
    from turbollm.quantization import gpu_kernels
    torch.manual_seed(rows)
    w = torch.randn(4096, 1024) * 0.02
    x = torch.randn(rows, 1024).bfloat16().float()  # the bf16 activations the GPU computes in
    q, s = quantize_fp8(w)
    state = fp8.Fp8State(q.cuda(), s.cuda())
    xg = x.cuda().bfloat16()
    if not fp8.fp8_tensor_cores(xg.device):
        pytest.skip("this GPU has no fp8 tensor cores (compute capability < 8.9)")
    y = fp8.fp8_linear(xg, state).float().cpu()
    assert y.shape == (rows, 4096) and bool(torch.isfinite(y).all())
    if rows < gpu_kernels.WIDEN_FROM_ROWS:
        assert fp8.fp8_kernel(xg, state) == "triton"
        ref = x @ dequantize_fp8(q, s).t()
    else:  # against the product of the GPU's own rounding of x (tested on CPU above)
        assert fp8.fp8_kernel(xg, state) == "scaled_mm"
        xq, xs = quantize_rows_fp8(xg)
        ref = (xq.float().cpu() * xs.cpu()) @ dequantize_fp8(q, s).t()
    tol = ref.abs().amax(1, keepdim=True) * 2 ** -7  # bf16 output: 2^-8 of each row's magnitude
    assert bool(((y - ref).abs() <= tol).all())


def test_install_rejects_wrong_forms():
    layer = ReplicatedLinear(64, 32)
    q, s = quantize_fp8(torch.randn(32, 64))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        install_fp8(layer, q.float(), s)
    with pytest.raises(ValueError, match="one scale per output row"):
        install_fp8(layer, q, s[:5])


@pytest.mark.slow
def test_fp8_model_perplexity_and_bytes(bundled_gguf, monkeypatch):
    """Both kernels on the bundled model: quality near fp32, half the weight bytes of bf16."""
    from turbollm import LLM
    from turbollm.corpus import corpus_token_ids
    from turbollm.eval.perplexity import perplexity
    from turbollm.quantization.weight_bytes import model_weight_bytes

    def ppl(llm, ids):
        return perplexity(llm.score_logits, ids, max_length=len(ids)).perplexity

    ref_llm = LLM(str(bundled_gguf), dtype="float32", quantization="none",
                  kv_cache_memory="32MiB")
    ids = corpus_token_ids(ref_llm.tokenizer, max_tokens=256)
    ref = ppl(ref_llm, ids)
    llm = LLM(str(bundled_gguf), dtype="float32", quantization="fp8", kv_cache_memory="32MiB")
    model = llm.engine.executor.worker.runner.model
    assert model.model.layers[0].mlp.down_proj.quant_method.name == "fp8"
    assert model.lm_head.quant_method.name == "none"  # dense, as vLLM serves fp8 checkpoints
    wb = model_weight_bytes(model)
    assert 0.5 < wb["linear"] / wb["linear_bf16"] < 0.51  # 1 byte a weight + a scale a row
    weight_only = ppl(llm, ids)
    monkeypatch.setattr(fp8, "fp8_kernel", lambda x, state: "scaled_mm")
    scaled = ppl(llm, ids)
    # measured: +1.7% (weight only), +2.6% (fp8 activations too)
    assert ref * 0.99 <= weight_only <= ref * 1.03, (weight_only, ref)
    assert ref * 0.99 <= scaled <= ref * 1.04, (scaled, ref)
    assert scaled != weight_only  # the patched kernel really served

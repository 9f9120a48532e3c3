"""GPTQ: lower output error than round-to-nearest on the calibration inputs of every layer,
installed layers computing their dequantized weights, and lower perplexity than RTN int4 on the
bundled model."""
from __future__ import annotations

import pytest
import torch

from turbollm.quantization import kernels
from calib_target import calibration_target

from turbollm.worker.calibration import (calibration_windows, collect_stats, corpus_token_ids,
                                         decoder_linears, window_runner)

from turbollm.quantization.gptq import gptq_quantize_weight, output_error
from turbollm.quantization.int4 import dequantize_int4, quantize_int4_rtn
from turbollm.quantization.int4_result import install_int4_weights

KW = dict(dtype="float32", device="cpu", num_threads=1)


@pytest.fixture(scope="module")
def tiny_stats(tiny_llama):
    from turbollm import LLM
    from turbollm.corpus import builtin_corpus_text
    llm = LLM(str(tiny_llama), kv_cache_memory="16MiB", **KW)
    ids = corpus_token_ids(llm.tokenizer, builtin_corpus_text(max_chars=20000))
    linears = decoder_linears(llm.engine.executor.worker.model)
    stats = collect_stats(window_runner(calibration_target(llm)), calibration_windows(ids, 8, 64),
                          linears, hessian=True, abs_stats=False, progress=False)
    return llm, linears, stats


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_on_every_layer(tiny_stats, act_order):
    _, linears, stats = tiny_stats
    assert len(linears) == 8 and all(st.rows == 8 * 64 for st in stats.values())
    for name, layer in linears.items():
        w, h = layer.weight.float(), stats[name].hessian
        rtn = dequantize_int4(*quantize_int4_rtn(w, 32), 32)
        res = gptq_quantize_weight(w, h, 32, act_order=act_order)
        assert (res.perm is not None) == act_order
        e_gptq, e_rtn = output_error(w, res.dequantize(), h), output_error(w, rtn, h)
        assert e_gptq < 0.9 * e_rtn, (name, e_gptq, e_rtn)


def test_output_error_is_the_sum_of_squared_output_differences():
    g = torch.Generator().manual_seed(0)
    w, wq, x = (torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g),
                torch.randn(50, 32, generator=g))
    direct = float(((x @ w.T - x @ wq.T) ** 2).sum())
    assert output_error(w, wq, x.T @ x) == pytest.approx(direct, rel=1e-4)


def test_gptq_handles_dead_channels_and_installed_layer_matches_reference():
    from turbollm.layers.linear import ReplicatedLinear
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3, 64)
    x[:, 5] = 0  # a channel never active in calibration
    w = torch.randn(48, 64, generator=g)
    res = gptq_quantize_weight(w, x.T @ x, 32, act_order=True)
    assert int(res.qweight.max()) <= 15 and torch.isfinite(res.scales).all()
    assert int(res.perm[-1]) == 5  # act-order walks the dead channel last
    layer = ReplicatedLinear(64, 48, dtype=torch.float32)
    layer.weight.data.copy_(w)
    install_int4_weights(layer, res)
    assert layer.weight is None and "act_order" in layer.quant_method.name
    xt = torch.randn(3, 64, generator=g)
    # A few rows are rounded to int16 by the packed kernel, in the weight's (permuted) column
    # order: the reference sees the same x.
    seen = xt.clone()
    if kernels.rounds_activations(xt, 32):
        seen[:, res.perm] = kernels.int16_activations(xt[:, res.perm])
    torch.testing.assert_close(layer(xt), seen @ res.dequantize().T, rtol=1e-4, atol=1e-4)


def test_calibration_windows_are_spread_and_leave_the_tail_out():
    ids = list(range(1000))
    wins = calibration_windows(ids, 4, 100)
    assert [w[0] for w in wins] == [0, 267, 533, 800]
    assert all(len(w) == 100 and w[-1] < 900 for w in wins)
    with pytest.raises(ValueError, match="needs 100 tokens"):
        calibration_windows(ids[:50], 4, 100)


@pytest.mark.slow
def test_gptq_perplexity_below_rtn_on_bundled_model(bundled_gguf):
    from calib_ppl_helper import quantized_perplexity
    rtn = quantized_perplexity(bundled_gguf, "rtn")
    gptq = quantized_perplexity(bundled_gguf, "gptq")
    assert gptq < rtn, (gptq, rtn)


def test_quantization_gptq_at_load(tiny_llama):
    """LLM(quantization='gptq') calibrates on the built-in corpus and serves int4."""
    from turbollm import LLM
    ref = LLM(str(tiny_llama), kv_cache_memory="16MiB", **KW)
    llm = LLM(str(tiny_llama), kv_cache_memory="16MiB", quantization="gptq",
              quantization_group_size=32, **KW)
    layers = decoder_linears(llm.engine.executor.worker.model)
    assert all(m.quant_method.name == "int4" and m.weight is None for m in layers.values())
    probe = ref.tokenizer("class A:\n    def method(self):\n        pass").input_ids
    got, want = llm.score_logits(probe), ref.score_logits(probe)
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.95

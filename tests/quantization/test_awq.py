"""AWQ: the scale folds leave the float model unchanged (GQA value/output fold and qkv bias
included), the search never scores worse than RTN, and AWQ int4 beats RTN int4 in perplexity on
the bundled model."""
from __future__ import annotations

import pytest
import torch

from turbollm.quantization.awq import awq_quantize_model, search_scales
from calib_target import calibration_target

from turbollm.worker.calibration import (calibration_windows, collect_stats, corpus_token_ids,
                                         decoder_linears, window_runner)


KW = dict(dtype="float32", device="cpu", num_threads=1, kv_cache_memory="16MiB")


def _awq_stats(llm):
    from turbollm.corpus import builtin_corpus_text
    ids = corpus_token_ids(llm.tokenizer, builtin_corpus_text(max_chars=20000))
    return ids, collect_stats(window_runner(calibration_target(llm)), calibration_windows(ids, 8, 64),
                              decoder_linears(llm.engine.executor.worker.model), hessian=False, abs_stats=True,
                              sample_rows_per_window=32, progress=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # GQA 4:2 heads; qwen2 has a qkv bias
def test_awq_folds_keep_the_float_model(tiny_model_factory, kind, monkeypatch):
    from turbollm import LLM
    from turbollm.quantization import awq

    def sqrt_scales(weight, act_mean, x, group_size, n_grid):  # alpha 0.5: scales far from 1
        s = act_mean.clamp(min=1e-4).sqrt()
        return s / (s.max() * s.min()).sqrt(), None, 0.0, 0.0
    monkeypatch.setattr(awq, "search_scales", sqrt_scales)
    llm = LLM(str(tiny_model_factory(kind)), **KW)
    ids, stats = _awq_stats(llm)
    probe = ids[-40:]
    before = llm.score_logits(probe)
    norms_before = llm.engine.executor.worker.model.model.layers[0].input_layernorm.weight.clone()
    awq_quantize_model(llm.engine.executor.worker.model, stats, 32, n_grid=5, progress=False, fold_only=True)
    assert not torch.equal(norms_before, llm.engine.executor.worker.model.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(llm.score_logits(probe), before, rtol=1e-4, atol=1e-4)


def test_awq_search_scores_no_worse_than_rtn_and_prefers_salient_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= 30  # a few salient input channels, as in real LLM activations
    w = torch.randn(64, 128, generator=g)
    s, res, err, rtn_err = search_scales(w, x.abs().mean(0), x, 32, n_grid=10)
    assert err < 0.9 * rtn_err
    assert float(s[:4].min()) > float(s[4:].max())  # salient channels scaled up
    # the returned int4 weights are those of W * s: x / s through them approximates x W^T
    approx = (x / s) @ res.dequantize().T
    assert float(((approx - x @ w.T) ** 2).mean()) == pytest.approx(err, rel=1e-3)


def test_awq_quantized_model_runs_int4_and_stays_close(tiny_llama):
    from turbollm import LLM
    llm = LLM(str(tiny_llama), **KW)
    ids, stats = _awq_stats(llm)
    probe = ids[-40:]
    ref = llm.score_logits(probe)
    results = awq_quantize_model(llm.engine.executor.worker.model, stats, 32, n_grid=5, progress=False)
    assert len(results) == 8
    assert all(m.quant_method.name == "int4" for m in decoder_linears(llm.engine.executor.worker.model).values())
    got = llm.score_logits(probe)
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.95


@pytest.mark.slow
def test_awq_perplexity_below_rtn_on_bundled_model(bundled_gguf):
    from calib_ppl_helper import quantized_perplexity
    rtn = quantized_perplexity(bundled_gguf, "rtn")
    awq = quantized_perplexity(bundled_gguf, "awq")
    assert awq < rtn, (awq, rtn)


def test_quantization_awq_at_load_refuses_quantized_weights_and_runs_on_dense(tiny_llama):
    from turbollm import LLM
    from turbollm.worker.calibration import apply_calibrated_quantization
    llm = LLM(str(tiny_llama), quantization="awq", quantization_group_size=32, **KW)
    assert all(m.quant_method.name == "int4"
               for m in decoder_linears(llm.engine.executor.worker.model).values())
    with pytest.raises(ValueError, match="already quantized"):
        apply_calibrated_quantization(calibration_target(llm), "awq", 32)

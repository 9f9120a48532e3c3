"""Perplexity of the bundled model after int4 quantization by RTN, AWQ or GPTQ at group size 128,
held-out text, shared by test_awq.py and test_gptq.py (kept small for CI: 8 calibration windows
of 256 tokens, 1024 evaluation tokens)."""
from __future__ import annotations

from functools import lru_cache

GROUP_SIZE = 128
EVAL_TOKENS = 1024


@lru_cache(maxsize=None)
def quantized_perplexity(gguf_path, method: str) -> float:
    from turbollm import LLM
    from turbollm.eval.perplexity import perplexity
    from calib_target import calibration_target
    from turbollm.worker.calibration import (apply_calibrated_quantization, corpus_token_ids,
                                             decoder_linears, heldout_token_ids)
    from turbollm.quantization.int4 import install_int4, quantize_int4_rtn
    from turbollm.quantization.int4_result import model_group_size

    llm = LLM(str(gguf_path), dtype="float32", device="cpu", quantization="none")
    ids = corpus_token_ids(llm.tokenizer)
    if method == "rtn":  # the same (model-wide) group size AWQ and GPTQ end up with
        linears = decoder_linears(llm.engine.executor.worker.model)
        g = model_group_size([m.in_features for m in linears.values()], GROUP_SIZE)
        for m in linears.values():
            install_int4(m, *quantize_int4_rtn(m.weight, g), g)
    elif method != "fp32":
        apply_calibrated_quantization(calibration_target(llm), method, GROUP_SIZE, num_windows=8,
                                      window_len=256, progress=False)
    held = heldout_token_ids(ids)[:EVAL_TOKENS]
    return perplexity(llm.score_logits, held, max_length=512, stride=256).perplexity

"""Perplexity of the bundled SmolLM2 under each precision against its fp32 model (a reduced
slice of the built-in corpus; the full numbers are in docs/quantization.md)."""
from __future__ import annotations

import pytest

from turbollm import LLM
from turbollm.corpus import corpus_token_ids
from turbollm.eval.perplexity import perplexity

pytestmark = pytest.mark.slow
TOKENS = 256
# Scoring in chunks of 32 tokens makes every chunk after the first attend to K/V read back from
# the cache, so a quantized KV cache is really exercised (one chunk would use fresh K/V only).
CHUNKED = dict(max_num_batched_tokens=32)


def _ppl(llm, ids) -> float:
    return perplexity(llm.score_logits, ids, max_length=len(ids)).perplexity


@pytest.fixture(scope="module")
def reference(bundled_gguf):
    llm = LLM(str(bundled_gguf), dtype="float32", quantization="none", kv_cache_memory="32MiB",
              **CHUNKED)
    ids = corpus_token_ids(llm.tokenizer, max_tokens=TOKENS)
    assert len(ids) == TOKENS
    return ids, _ppl(llm, ids)


@pytest.mark.parametrize("label,kwargs,limit", [
    ("bf16", dict(dtype="bfloat16", quantization="none"), 0.005),
    ("int8", dict(dtype="float32", quantization="int8"), 0.01),
    ("kv-int8", dict(dtype="float32", quantization="none", kv_cache_dtype="int8"), 0.01),
    ("kv-fp16", dict(dtype="float32", quantization="none", kv_cache_dtype="float16"), 0.002),
])
def test_perplexity_within_limit(bundled_gguf, reference, label, kwargs, limit):
    ids, ref = reference
    chunked = CHUNKED if "kv_cache_dtype" in kwargs else {}
    llm = LLM(str(bundled_gguf), kv_cache_memory="32MiB", **chunked, **kwargs)
    ppl = _ppl(llm, ids)
    assert ppl <= ref * (1 + limit), f"{label}: {ppl:.4f} vs fp32 {ref:.4f}"
    assert ppl >= ref * 0.98  # a broken path would not land this close by chance

"""Pruning quality on the bundled SmolLM2-135M: the published orderings hold on held-out text
(kept small for CI: 8 calibration windows of 128 tokens, 640 held-out tokens; the full table
with 32 windows is in docs/compression.md)."""
from __future__ import annotations

import pytest
import torch

from turbollm.compress.calib import CalibConfig, calibration_llm, linear_stats
from turbollm.compress.prune import PruneConfig, prune_tensors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled(bundled_gguf):
    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.calibration import corpus_token_ids, heldout_token_ids
    from turbollm.worker.model_loader import iter_checkpoint
    llm = calibration_llm(str(bundled_gguf))
    source = dict(iter_checkpoint(resolve_model(str(bundled_gguf)), torch.float32))
    stats = linear_stats(llm, CalibConfig(num_windows=8, window_len=128), hessian=False,
                         progress=False)
    held = heldout_token_ids(corpus_token_ids(llm.tokenizer))[:640]
    return llm, source, stats, held


def _perplexity(bundled, cfg: PruneConfig | None) -> float:
    """Perplexity with the pruned weights loaded into the engine's model in place."""
    from turbollm.eval.perplexity import perplexity
    llm, source, stats, held = bundled
    tensors = dict(source)
    if cfg is not None:
        sparsity = prune_tensors(tensors, cfg, stats, progress=False)
        assert sparsity >= 0.5
    llm.engine.executor.worker.model.load_weights(tensors.items())
    return perplexity(llm.score_logits, held, max_length=320, stride=160).perplexity


def test_wanda_beats_magnitude_at_50_percent_and_2_4(bundled):
    dense = _perplexity(bundled, None)
    ppl = {(m, p): _perplexity(bundled, PruneConfig(m, None if p else 0.5, p))
           for m in ("magnitude", "wanda") for p in (None, (2, 4))}
    print(f"dense {dense:.2f}, " + ", ".join(f"{m} {p or '50%'} {v:.2f}"
                                             for (m, p), v in ppl.items()))
    assert dense < ppl["wanda", None] < ppl["magnitude", None]
    assert ppl["wanda", (2, 4)] < ppl["magnitude", (2, 4)]
    # unstructured 50% keeps more freedom than 2:4 at the same sparsity
    assert ppl["wanda", None] < ppl["wanda", (2, 4)]

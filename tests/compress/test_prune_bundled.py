"""Pruning quality on the bundled SmolLM2-135M: the published orderings hold on held-out text
(kept small for CI: 8 calibration windows of 128 tokens, one 256-token window of held-out text;
the full table, with 32 windows and magnitude 2:4, SparseGPT and structured rows, is in
docs/compression.md)."""
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
    held = heldout_token_ids(corpus_token_ids(llm.tokenizer))[:256]
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
    return perplexity(llm.score_logits, held, max_length=256).perplexity  # one window


def test_wanda_beats_magnitude_at_50_percent(bundled):
    dense = _perplexity(bundled, None)
    magnitude = _perplexity(bundled, PruneConfig("magnitude", 0.5))
    wanda = _perplexity(bundled, PruneConfig("wanda", 0.5))
    wanda_24 = _perplexity(bundled, PruneConfig("wanda", pattern=(2, 4)))
    print(f"dense {dense:.2f}, magnitude 50% {magnitude:.2f}, wanda 50% {wanda:.2f}, "
          f"wanda 2:4 {wanda_24:.2f}")
    assert dense < wanda < magnitude
    # unstructured 50% keeps more freedom than 2:4 at the same sparsity
    assert wanda < wanda_24

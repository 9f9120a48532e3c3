"""Perplexity: window arithmetic, and equality with an independent transformers computation."""
import math

import pytest
import torch

from turbollm.corpus import builtin_corpus_text
from turbollm.eval.perplexity import perplexity, windows


@pytest.mark.parametrize("n,max_length,stride", [(10, 4, 2), (10, 4, 3), (7, 10, 3),
                                                 (100, 32, 7), (33, 32, 16), (2, 2, 1)])
def test_windows_score_every_token_once(n, max_length, stride):
    scored = []
    for begin, end, first in windows(n, max_length, stride):
        assert end - begin <= max_length and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_windows_reject_bad_arguments():
    with pytest.raises(ValueError):
        list(windows(10, 1, 1))
    with pytest.raises(ValueError):
        list(windows(10, 4, 4))


def test_builtin_corpus_is_stable_text():
    text = builtin_corpus_text(5000)
    assert len(text) == 5000 and text == builtin_corpus_text(5000)


def test_perplexity_matches_transformers(tiny_llama):
    """Our sliding-window perplexity equals the same windows scored by transformers (fp32)."""
    import transformers

    from turbollm.llm import LLM
    path = tiny_llama
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path),
                                                                 dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", device="cpu", num_threads=1,
              max_num_batched_tokens=24)  # chunks the windows: scoring spans several forwards
    vocab = hf_model.config.vocab_size
    ids = torch.randint(0, vocab, (150,), generator=torch.Generator().manual_seed(0)).tolist()

    def hf_score(tokens):
        with torch.no_grad():
            return hf_model(torch.tensor([tokens])).logits[0].float()

    ours = perplexity(llm.score_logits, ids, max_length=64, stride=24)
    ref = perplexity(hf_score, ids, max_length=64, stride=24)
    assert ours.num_tokens == ref.num_tokens == 149
    assert abs(ours.perplexity / ref.perplexity - 1) < 1e-3
    assert math.isfinite(ours.perplexity) and ours.perplexity > 1
    # Scoring does not leak KV blocks.
    llm.engine.kv_manager.check_invariant()
    assert llm.engine.kv_manager.pool.num_used == 0


def test_score_logits_rejects_bad_input(tiny_llama):
    from turbollm.engine.errors import RequestValidationError
    from turbollm.llm import LLM
    llm = LLM(str(tiny_llama), dtype="float32", device="cpu", num_threads=1)
    with pytest.raises(RequestValidationError):
        llm.score_logits([])
    with pytest.raises(RequestValidationError):
        llm.score_logits([10**9])

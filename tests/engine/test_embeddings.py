"""LLM.embed against Hugging Face transformers: the final normed hidden states of the base
model, mean-pooled or the last position's, scaled to unit length (prefilled in chunks)."""
from __future__ import annotations

import pytest
import torch

from turbollm import LLM
from turbollm.engine.errors import RequestValidationError

PROMPTS = [[1, 17, 923, 4410, 88, 5, 3021] * 6, [1, 42, 7]]  # 42 tokens (3 chunks of 16), 3


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), dtype="float32", kv_cache_memory="8MiB", num_threads=1,
               max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def hf_hidden(tiny_llama):
    from transformers import AutoModel
    model = AutoModel.from_pretrained(str(tiny_llama), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).last_hidden_state[0] for ids in PROMPTS]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_match_transformers(llm, hf_hidden, pooling):
    ours = torch.tensor(llm.embed(PROMPTS, pooling=pooling))
    ref = torch.stack([h.mean(0) if pooling == "mean" else h[-1] for h in hf_hidden])
    ref = ref / ref.norm(dim=1, keepdim=True)
    assert ours.shape == ref.shape == (2, 64)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    (raw,) = torch.tensor(llm.embed(PROMPTS[1], pooling=pooling, normalize=False))
    assert raw.norm() > 1.5  # unnormalized really is the raw pooled state
    torch.testing.assert_close(raw / raw.norm(), ref[1], atol=2e-5, rtol=1e-4)


def test_text_prompt_and_bad_input(llm):
    assert len(llm.embed("Hello world")[0]) == 64
    with pytest.raises(RequestValidationError, match="pooling"):
        llm.embed([1, 2], pooling="max")
    with pytest.raises(RequestValidationError, match="empty"):
        llm.embed([[]])
    pool = llm.engine.kv_manager.pool
    assert pool.num_free + pool.num_cached == pool.num_blocks  # borrowed blocks went back

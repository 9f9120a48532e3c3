"""Prompt logprobs (SamplingParams.prompt_logprobs): every prompt token scored given the tokens
before it, across prefill chunks, prefix-cache hits, n > 1 and preemption."""
import random

import pytest
import torch

from turbollm import LLM, SamplingParams
from turbollm.engine.errors import RequestValidationError


@pytest.fixture(scope="module")
def llm(tiny_llama):
    # A 128-token step budget: a 400-token prompt is prefilled in four chunks.
    return LLM(str(tiny_llama), dtype="float32", kv_cache_memory="16MiB", block_size=16,
               max_num_seqs=16, max_num_batched_tokens=128)


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 49152) for _ in range(n)]


TOL = 1e-4


def check_against_scoring(llm, ids, got, k):
    """Each entry equals log_softmax of the engine's full-sequence logits at the position."""
    assert got[0] is None and len(got) == len(ids)
    lp = llm.engine.score_logits(ids).log_softmax(dim=-1)
    for p in range(1, len(ids)):
        row, pos = lp[p - 1], got[p]
        assert pos.sampled.token_id == ids[p]
        assert pos.sampled.logprob == pytest.approx(row[ids[p]].item(), abs=TOL)
        # Chunking changes float sums: near-ties may order either way.
        v = row[ids[p]]
        assert int((row > v + TOL).sum()) < pos.sampled.rank <= int((row > v - TOL).sum()) + 1
        assert len(pos.top) == k
        if k:
            assert [t.logprob for t in pos.top] == pytest.approx(row.topk(k).values.tolist(),
                                                                abs=TOL)
            assert all(row[t.token_id] == pytest.approx(t.logprob, abs=TOL) for t in pos.top)
            assert [t.rank for t in pos.top] == list(range(1, k + 1))


def test_prompt_logprobs_across_chunks_match_full_scoring(llm):
    ids = prompt(400)
    out = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    check_against_scoring(llm, ids, out.prompt_logprobs, 3)
    assert llm.engine.kv_manager.pool.num_used == 0


def test_prompt_logprobs_ignore_prefix_cache_hits(llm):
    ids = prompt(100, seed=1)
    plain = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([ids], plain)  # caches the prompt's full blocks
    kv = llm.engine.kv_manager
    hits = kv.prefix_hits
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    assert kv.prefix_hits == hits  # scored in full, not read from the cache
    check_against_scoring(llm, ids, out.prompt_logprobs, 0)
    llm.generate([ids], plain)
    assert kv.prefix_hits > hits  # requests without prompt logprobs still hit
    assert out.outputs[0].token_ids == llm.generate([ids], plain)[0].outputs[0].token_ids


def test_prompt_logprobs_with_n_and_in_a_batch(llm):
    ids = prompt(70, seed=2)
    p = SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=5, prompt_logprobs=1)
    others = [prompt(40, seed=s) for s in range(3, 6)]
    outs = llm.generate([ids] + others, [p] + [SamplingParams(max_tokens=4)] * 3)
    assert len(outs[0].outputs) == 3
    check_against_scoring(llm, ids, outs[0].prompt_logprobs, 1)
    assert all(o.prompt_logprobs is None for o in outs[1:])


def test_prompt_logprobs_survive_preemption(tiny_llama, llm):
    small = LLM(str(tiny_llama), dtype="float32", block_size=16, max_num_seqs=16,
                max_num_batched_tokens=64, num_gpu_blocks_override=12)
    ids = [prompt(90, seed=s) for s in range(8)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, prompt_logprobs=0)
    outs = small.generate(ids, params)
    assert small.engine.scheduler.num_preemptions > 0
    for i, o in zip(ids, outs):
        check_against_scoring(llm, i, o.prompt_logprobs, 0)
    pool = small.engine.kv_manager.pool
    pool.check_invariant()
    assert pool.num_used == 0


def test_prompt_logprobs_limit(llm):
    with pytest.raises(RequestValidationError, match="prompt_logprobs"):
        llm.generate(["hello"], SamplingParams(prompt_logprobs=21))
    one = llm.generate([[5]], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert one.prompt_logprobs == [None]


def test_token_logprobs_helper_matches_log_softmax():
    from turbollm.layers.sampler import token_logprobs
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    tokens = torch.tensor([0, 7, 49, 3, 3])
    got = token_logprobs(logits, tokens, 4)
    ref = logits.log_softmax(-1)
    for r, lp in enumerate(got):
        assert lp.token_id == tokens[r].item()
        assert lp.logprob == pytest.approx(ref[r, tokens[r]].item(), abs=1e-6)
        assert [t for t, _ in lp.top] == ref[r].topk(4).indices.tolist()

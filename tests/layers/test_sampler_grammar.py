"""The sampler's grammar bitmask: constrained rows sample only allowed tokens, the others are
untouched (same tokens as a batch without any mask), and no mask means no mask work."""
from __future__ import annotations

import numpy as np
import torch

from turbollm.layers.sampler import Sampler, SamplingMetadata, make_generator
from turbollm.sampling_params import SamplingParams

V = 1000


def bitmask(allowed: list[int]) -> np.ndarray:
    words = np.zeros((V + 31) // 32, dtype=np.uint32)
    for t in allowed:
        words[t // 32] |= np.uint32(1 << (t % 32))
    return words.view(np.int32)


def run(logits, params, masks, seeds):
    gens = [make_generator(s, "cpu") if s is not None else None for s in seeds]
    meta = SamplingMetadata.build(params=params, prompt_token_ids=[[1]] * len(params),
                                  output_token_ids=[[]] * len(params), generators=gens,
                                  vocab_size=V, device="cpu", grammar_bitmasks=masks)
    return meta, Sampler()(logits, meta).sampled_token_ids


def test_constrained_rows_obey_the_mask_and_others_are_unchanged():
    torch.manual_seed(0)
    logits = torch.randn(6, V) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.7, seed=6),
              SamplingParams(temperature=1.0, top_k=50, seed=7),
              SamplingParams(temperature=0, repetition_penalty=1.3)]
    seeds = [p.seed for p in params]
    allowed = {1: [3, 999, 500], 3: [31, 32, 33], 5: [0]}  # token 999: last word, high bit
    masks = [bitmask(allowed[i]) if i in allowed else None for i in range(6)]
    before = logits.clone()
    meta, got = run(logits, params, masks, seeds)
    assert torch.equal(logits, before)  # the raw logits (logprobs) are not modified
    assert meta.grammar_rows == [1, 3, 5]
    addend = meta.grammar_addend  # CPU: 0 on allowed tokens, -inf on banned ones
    assert addend.shape == (3, V) and (addend == 0).sum() == 7
    assert np.isneginf(addend).sum() == 3 * V - 7
    for i, toks in allowed.items():
        assert got[i] in toks
    assert got[1] == max(toks := allowed[1], key=lambda t: logits[1, t].item())  # greedy
    _, plain = run(logits, params, [None] * 6, seeds)
    for i in (0, 2, 4):
        assert got[i] == plain[i]
    assert any(plain[i] not in allowed[i] for i in allowed)  # the mask did change something


def test_all_rows_constrained():
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0)] * 3
    meta, got = run(logits, params, [bitmask([i, 7 + i]) for i in range(3)], [None] * 3)
    assert meta.grammar_rows == [0, 1, 2] and meta.grammar_addend.shape == (3, V)
    assert all(t in (i, 7 + i) for i, t in enumerate(got))


def test_no_mask_builds_nothing():
    params = [SamplingParams(temperature=0)] * 2
    meta, _ = run(torch.randn(2, V), params, [None, None], [None, None])
    assert meta.grammar_rows is None and meta.grammar_addend is None
    meta, _ = run(torch.randn(2, V), params, None, [None, None])
    assert meta.grammar_rows is None


def test_mask_sets_banned_to_minus_inf_and_leaves_allowed_bits_alone():
    from turbollm.layers.sampler import apply_grammar_masks
    torch.manual_seed(1)
    logits = torch.randn(3, V) * 5
    allowed = {0: [0, 31, 32, 999], 2: list(range(100, 900))}
    meta = SamplingMetadata.build(
        params=[SamplingParams(temperature=0)] * 3, prompt_token_ids=[[1]] * 3,
        output_token_ids=[[]] * 3, generators=[None] * 3, vocab_size=V, device="cpu",
        grammar_bitmasks=[bitmask(allowed[0]), None, bitmask(allowed[2])])
    x = logits.clone()
    apply_grammar_masks(x, meta)
    assert torch.equal(x[1], logits[1])
    for r, toks in allowed.items():
        keep = torch.zeros(V, dtype=torch.bool)
        keep[toks] = True
        assert torch.equal(x[r][keep], logits[r][keep])
        assert torch.isneginf(x[r][~keep]).all()

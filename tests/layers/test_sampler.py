"""Batched sampler: processors, greedy/random sampling, seeds, logprobs."""

import math

import pytest
import torch

from turbollm.layers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
)
from turbollm.sampling_params import SamplingParams

SAMPLER = Sampler()


def run(logits, params, prompts=None, outputs=None, gens=None, eos=()):
    """Build metadata for `params` and sample once; returns (SamplerOutput, metadata)."""
    R, V = logits.shape
    meta = SamplingMetadata.build(
        params,
        prompts or [[] for _ in range(R)],
        outputs or [[] for _ in range(R)],
        gens or [None] * R,
        V,
        logits.device,
        eos,
    )
    return SAMPLER(logits, meta), meta


def repeat(row, n):
    return torch.tensor(row, dtype=torch.float32).repeat(n, 1)


def test_greedy_is_argmax_and_defaults_cost_nothing():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    out, meta = run(logits, [SamplingParams(temperature=0)] * 8)
    assert out.sampled_token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8
    assert meta.all_greedy and meta.temperature is None and meta.top_k is None
    assert meta.top_p is None and meta.penalty_rows is None and meta.bias_rows is None


def test_default_random_rows_build_no_processor_tensors():
    _, meta = run(torch.randn(3, 10), [SamplingParams()] * 3)
    assert meta.all_random
    fields = [meta.temperature, meta.top_k, meta.top_p, meta.min_p]
    assert all(f is None for f in fields + [meta.penalty_rows, meta.mask_rows])


def test_forward_does_not_modify_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    before = logits.clone()
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.3, logit_bias={3: 5.0})] * 4
    run(logits, params, prompts=[[1, 2]] * 4, outputs=[[3]] * 4)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_equals_greedy(temperature):
    torch.manual_seed(1)
    logits = torch.randn(16, 200)
    out, _ = run(logits, [SamplingParams(temperature=temperature, top_k=1)] * 16)
    assert out.sampled_token_ids == logits.argmax(-1).tolist()


def test_top_k_never_samples_outside_top_k():
    torch.manual_seed(2)
    row = torch.randn(50)
    allowed = set(row.topk(5).indices.tolist())
    n = 3000
    # Half the rows also without top_k, to exercise the per-row "disabled" value.
    params = [SamplingParams(top_k=5, temperature=2.0)] * n + [SamplingParams(temperature=2.0)] * n
    out, _ = run(row.repeat(2 * n, 1), params)
    with_k, without_k = set(out.sampled_token_ids[:n]), set(out.sampled_token_ids[n:])
    assert with_k <= allowed and len(with_k) == 5
    assert len(without_k - allowed) > 0


def test_top_p_never_samples_outside_nucleus():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = repeat([math.log(p) for p in probs], 4000)
    # mass before token 1 = 0.5 < 0.7 (kept); before token 2 = 0.8 >= 0.7 (dropped)
    out, _ = run(logits, [SamplingParams(top_p=0.7)] * 4000)
    counts = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    # renormalized over the nucleus: 0.5/0.8 = 0.625
    assert abs(counts[0].item() / 4000 - 0.625) < 0.04


def test_top_k_and_top_p_together():
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = repeat([math.log(p) for p in probs], 3000)
    # top_k=2 cuts what top_p=0.99 alone would keep (all four tokens)
    out, _ = run(logits, [SamplingParams(top_k=2, top_p=0.99)] * 3000)
    assert set(out.sampled_token_ids) == {0, 1}
    # top_p sees the renormalized top-k mass: with top_k=3 token 0 has 0.4/0.9 = 0.444 >= 0.42,
    # so only token 0 survives (without the renormalization token 1 would too)
    out, _ = run(logits, [SamplingParams(top_k=3, top_p=0.42)] * 3000)
    assert set(out.sampled_token_ids) == {0}


def reference_keep(row, k, p):
    """Kept tokens of one row by the textbook recipe: full sort, top-k, renormalize, nucleus."""
    vals, order = row.sort(descending=True)
    if k:
        vals = vals[:k]
    probs = vals.softmax(-1)
    n = int(((probs.cumsum(-1) - probs) < p).sum())
    return set(order[: max(n, 1)].tolist())


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked (nucleus in the candidates) / flat
def test_top_k_top_p_mask_matches_full_sort(scale):
    torch.manual_seed(4)
    V = 3000
    logits = torch.randn(5, V) * scale
    ks, ps = [0, 10, 400, 0, 1], [0.9, 0.5, 0.95, 0.3, 0.7]
    k_t, p_t = torch.tensor(ks), torch.tensor(ps)
    masked = apply_top_k_top_p(logits.clone(), k_t, p_t, max(ks))
    for r in range(5):
        kept = set(torch.isfinite(masked[r]).nonzero().flatten().tolist())
        assert kept == reference_keep(logits[r], ks[r], ps[r])
        assert torch.equal(masked[r][list(kept)], logits[r][list(kept)])


def test_min_p_never_samples_below_threshold():
    probs = [0.6, 0.3, 0.08, 0.02]
    logits = repeat([math.log(p) for p in probs], 4000)
    out, _ = run(logits, [SamplingParams(min_p=0.1)] * 4000)  # threshold 0.06
    got = set(out.sampled_token_ids)
    assert 3 not in got and 2 in got


def chi_square(counts, expected_probs):
    n = counts.sum().item()
    exp = torch.tensor(expected_probs, dtype=torch.float64) * n
    return (((counts.double() - exp) ** 2) / exp).sum().item()


def test_temperature_frequencies_match_softmax():
    torch.manual_seed(123)
    base = [1.0, 0.5, 0.0, -0.5, -1.5]
    T, n = 0.7, 40000
    out, _ = run(repeat(base, n), [SamplingParams(temperature=T)] * n)
    counts = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=5)
    expected = torch.softmax(torch.tensor(base) / T, -1).tolist()
    # chi-square, 4 degrees of freedom: 18.47 is the p=0.001 critical value
    assert chi_square(counts, expected) < 18.47
    # the same distribution at T=1 would be rejected: the test can tell temperatures apart
    assert chi_square(counts, torch.softmax(torch.tensor(base), -1).tolist()) > 100


def test_seeded_rows_match_softmax():
    base = [0.2, 1.0, -1.0]
    n = 3000
    gens = [make_generator(s, "cpu") for s in range(n)]
    out, _ = run(repeat(base, n), [SamplingParams(seed=0)] * n, gens=gens)
    counts = torch.bincount(torch.tensor(out.sampled_token_ids), minlength=3)
    assert chi_square(counts, torch.softmax(torch.tensor(base), -1).tolist()) < 13.8  # df=2


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, -2.0, 1.0], [2.0, -1.0, 3.0, 0.5, -2.0, 1.0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    prompts, outputs = [[1, 4], [1, 4]], [[2, 3, 3], [2, 3, 3]]
    meta = SamplingMetadata.build(
        [p, SamplingParams()], prompts, outputs, [None, None], 6, "cpu"
    )
    x = logits.clone()
    apply_penalties(x, meta)
    # row 0 by hand: seen = {1, 2, 3, 4}; output counts {2: 1, 3: 2}
    expected = [
        2.0,  # unseen
        -1.0 * 2.0,  # prompt, negative: multiplied
        3.0 / 2.0 - 0.25 * 1 - 0.5,  # output once
        0.5 / 2.0 - 0.25 * 2 - 0.5,  # output twice
        -2.0 * 2.0,  # prompt
        1.0,  # unseen
    ]
    assert torch.allclose(x[0], torch.tensor(expected))
    assert torch.equal(x[1], logits[1])  # default row untouched
    assert meta.penalty_rows.tolist() == [0]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    out, _ = run(logits, [SamplingParams(temperature=0, frequency_penalty=1.0)], outputs=[[0]])
    assert out.sampled_token_ids == [1]
    out, _ = run(logits, [SamplingParams(temperature=0, repetition_penalty=1.1)], prompts=[[0]])
    assert out.sampled_token_ids == [1]  # 3.0 / 1.1 = 2.73 < 2.9


def test_logit_bias():
    logits = torch.tensor([[5.0, 1.0, 0.0, -3.0]])
    out, _ = run(logits, [SamplingParams(temperature=0, logit_bias={3: 100.0})])
    assert out.sampled_token_ids == [3]
    out, _ = run(logits, [SamplingParams(temperature=0, logit_bias={0: -100.0, 99: 5.0})])
    assert out.sampled_token_ids == [1]  # id 99 is outside the vocab: dropped


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 9.0, 8.0, 1.0]])  # 1 = eos, 2 = stop token
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    out, _ = run(logits, [p], outputs=[[3]], eos=[1])
    assert out.sampled_token_ids == [3]
    out, _ = run(logits, [p], outputs=[[3, 3]], eos=[1])
    assert out.sampled_token_ids == [1]  # min_tokens reached
    ignore = p.replace(ignore_eos=True)
    out, _ = run(logits, [ignore], outputs=[[3]], eos=[1])
    assert out.sampled_token_ids == [1]  # eos is not a stop token when ignored


def test_min_tokens_masked_token_never_sampled():
    logits = repeat([0.0, 3.0, 0.0], 2000)
    out, _ = run(logits, [SamplingParams(min_tokens=1)] * 2000, eos=[1])
    assert 1 not in out.sampled_token_ids


def seeded_run(logits_steps, rows, target):
    """Sample one step per logits tensor for the batch `rows`; return row `target`'s tokens."""
    gens = [make_generator(p.seed, "cpu") if p.seed is not None else None for p in rows]
    tokens = []
    for step_logits in logits_steps:
        out, _ = run(step_logits, rows, gens=gens)
        tokens.append(out.sampled_token_ids[target])
    return tokens


def test_same_seed_same_tokens_regardless_of_batch():
    torch.manual_seed(5)
    V, steps = 1000, 12
    mine = [torch.randn(V) for _ in range(steps)]
    p = SamplingParams(seed=42, temperature=1.5)
    alone = seeded_run([m.unsqueeze(0) for m in mine], [p], 0)
    others = [SamplingParams(), SamplingParams(seed=7), SamplingParams(temperature=0, seed=1)]
    batch = [torch.stack([torch.randn(V), torch.randn(V), torch.randn(V), m]) for m in mine]
    torch.manual_seed(999)  # the shared generator state must not matter
    in_batch = seeded_run(batch, others + [p], 3)
    first = [torch.stack([m, torch.randn(V)]) for m in mine]
    at_front = seeded_run(first, [p, SamplingParams(top_p=0.9)], 0)
    assert alone == in_batch == at_front
    other_seed = seeded_run([m.unsqueeze(0) for m in mine], [p.replace(seed=43)], 0)
    assert other_seed != alone


def test_logprobs_from_raw_logits():
    torch.manual_seed(3)
    logits = torch.randn(3, 40)
    params = [
        SamplingParams(temperature=0, logprobs=5, logit_bias={7: 100.0}),  # forced token 7
        SamplingParams(temperature=0.5, logprobs=0, repetition_penalty=1.5),
        SamplingParams(temperature=0),  # no logprobs
    ]
    out, _ = run(logits, params, prompts=[[1], [1], [1]])
    lp = torch.log_softmax(logits, -1)
    first, second = out.logprobs[0], out.logprobs[1]
    assert out.logprobs[2] is None
    assert first.token_id == 7 == out.sampled_token_ids[0]
    assert first.logprob == pytest.approx(lp[0, 7].item(), abs=1e-6)
    assert first.rank == int((lp[0] > lp[0, 7]).sum()) + 1
    ids = [t for t, _ in first.top]
    vals = [v for _, v in first.top]
    assert ids == lp[0].topk(5).indices.tolist()
    assert vals == sorted(vals, reverse=True)
    assert vals == pytest.approx(lp[0].topk(5).values.tolist(), abs=1e-6)
    tok = out.sampled_token_ids[1]
    assert second.top == [] and second.token_id == tok
    assert second.logprob == pytest.approx(lp[1, tok].item(), abs=1e-6)


def test_greedy_logprob_rank_is_one():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    out, _ = run(logits, [SamplingParams(temperature=0, logprobs=2)])
    assert out.logprobs[0].rank == 1 and out.logprobs[0].top[0][0] == 1


def test_empty_batch():
    out, _ = run(torch.empty(0, 10), [])
    assert out.sampled_token_ids == [] and out.logprobs == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_seeded_and_processors():
    torch.manual_seed(0)
    V = 32000
    logits = torch.randn(4, V, device="cuda")
    logits[3] = logits[0]  # same logits, same seed: same token, whatever the batch around it
    p = SamplingParams(seed=3, top_k=50, top_p=0.9, min_p=0.01, presence_penalty=0.5)
    params = [p, SamplingParams(temperature=0), SamplingParams(), p]

    def go():
        gens = [make_generator(3, "cuda"), None, None, make_generator(3, "cuda")]
        out, _ = run(logits, params, outputs=[[1, 2]] * 4, gens=gens)
        return out.sampled_token_ids

    a, b = go(), go()
    assert a[0] == b[0] == a[3] == b[3]
    assert a[1] == logits[1].argmax().item()
    assert a[0] in logits[0].topk(50).indices.tolist()

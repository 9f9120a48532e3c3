"""Units of speculative decoding: n-gram lookup, the accept/resample rule, the k controller."""
import pytest
import torch
from chi2 import chi2_critical, chi2_statistic

from turbollm.spec_decode.controller import SpecController, expected_tokens
from turbollm.spec_decode.step_cost import linear_costs
from turbollm.spec_decode.ngram import propose_ngram
from turbollm.layers.rejection_sampler import verify_greedy, verify_random


def test_ngram_takes_longest_then_most_recent_match():
    toks = [5, 6, 7, 8, 1, 2, 9, 9, 6, 7, 3, 4, 6, 7]
    # Suffix [6, 7]: the 3-gram [x, 6, 7] has no earlier match; the 2-gram [6, 7] matches at
    # 1 and 8: the most recent one wins and [3, 4, 6] follows it.
    assert propose_ngram(toks, 3, n_min=1, n_max=3) == [3, 4, 6]
    # A longer match beats a more recent shorter one.
    toks = [1, 2, 3, 10, 11, 9, 3, 20, 1, 2, 3]
    assert propose_ngram(toks, 2, n_min=1, n_max=3) == [10, 11]
    assert propose_ngram(toks, 2, n_min=1, n_max=1) == [20, 1]


def test_ngram_no_match_and_limits():
    assert propose_ngram([1, 2, 3, 4], 3) == []
    assert propose_ngram([7], 3) == []
    assert propose_ngram([1, 2, 1], 0) == []
    assert propose_ngram([1, 2, 1], 5) == [2, 1]  # stops at the end of the sequence
    assert propose_ngram([4, 4, 4, 4], 2, n_min=2, n_max=2) == [4]


def test_verify_greedy_accepts_matching_prefix_then_corrects():
    assert verify_greedy([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]  # all + bonus
    assert verify_greedy([1, 2, 3], [1, 5, 3, 4]) == [1, 5]  # stop at the first mismatch
    assert verify_greedy([1, 2, 3], [7, 2, 3, 4]) == [7]
    assert verify_greedy([], [9]) == [9]


def test_verify_random_preserves_the_target_distribution():
    """The first emitted token is distributed as p whatever the proposal: a wrong rule (e.g.
    accepting always, or resampling from p instead of the residual) fails this test."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    probs = torch.stack([p, p])
    for proposal in (1, 4, 0):
        counts = [0] * 5
        for _ in range(6000):
            counts[verify_random([proposal], probs, gen)[0]] += 1
        stat, df = chi2_statistic(counts, p.tolist())
        assert stat < chi2_critical(df), (proposal, counts)


def test_verify_random_second_token_after_acceptance():
    """Joint (t1, t2) when the proposal is accepted: t2 ~ the second row's p."""
    gen = torch.Generator().manual_seed(1)
    p1 = torch.tensor([0.0, 1.0, 0.0])  # the proposal (1) is always accepted
    p2 = torch.tensor([0.5, 0.3, 0.2])
    counts = [0] * 3
    for _ in range(3000):
        out = verify_random([1], torch.stack([p1, p2]), gen)
        assert out[0] == 1 and len(out) == 2
        counts[out[1]] += 1
    stat, df = chi2_statistic(counts, p2.tolist())
    assert stat < chi2_critical(df)


def test_verify_random_reproducible_with_a_seed():
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(3)), -1)
    runs = [verify_random([3, 7, 9], probs, torch.Generator().manual_seed(42)) for _ in range(2)]
    assert runs[0] == runs[1]


def linear(max_k, per_token, proposal_cost=0.0, **kw):
    return SpecController(max_k=max_k, step_costs=linear_costs(max_k, per_token),
                          proposal_cost=proposal_cost, disable_batch_size=8, **kw)


def test_expected_tokens_counts_the_first_and_following_proposals():
    assert expected_tokens(0, 0.5, 0.5) == 1.0
    assert expected_tokens(3, 1.0, 1.0) == 4.0
    # the first accepted with 0.5, each next one with 0.9 after it
    assert expected_tokens(2, 0.5, 0.9) == pytest.approx(1 + 0.5 + 0.5 * 0.9)


def test_controller_picks_more_tokens_for_higher_acceptance():
    c = linear(8, 0.05)
    ks = [c.best_k(a, a) for a in (0.0, 0.3, 0.6, 0.9)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == 8
    # Expensive proposals (a draft as slow as the target) never pay.
    assert linear(8, 0.0, proposal_cost=1.0).best_k(0.6, 0.6) == 0


def test_controller_prices_each_k_by_the_measured_table():
    """A first extra row as dear as a whole step (the CPU's two-row kernels) and cheap ones
    after: one proposal never pays, several do when acceptance runs in bursts."""
    costs = [1.0, 1.9, 2.0, 2.1, 2.2]
    c = SpecController(max_k=4, step_costs=costs, proposal_cost=0.0, disable_batch_size=8)
    assert c.best_k(0.6, 0.95) == 4
    assert c.best_k(0.8, 0.0) == 0  # never two in a row: one token per step at best
    # with a fixed price per row of 0.25 the same rates would propose
    assert linear(4, 0.25).best_k(0.8, 0.0) == 1
    with pytest.raises(ValueError, match="step_costs"):
        SpecController(max_k=4, step_costs=costs[:3], proposal_cost=0.0, disable_batch_size=8)


def test_controller_learns_bursty_rates():
    """A step's first proposal and the ones after an accepted one are counted apart."""
    c = linear(8, 0.1, decay=1.0, prior_weight=1e-9)
    c.observe("r", 4, 0)  # first rejected: nothing learned about the next ones
    c.observe("r", 4, 4)  # all four kept: first accepted, 3 of 3 next accepted
    c.observe("r", 4, 2)  # first accepted, second accepted, third rejected: next 1 of 2
    first, nxt = c.rates("r")
    assert first == pytest.approx(2 / 3) and nxt == pytest.approx(4 / 5)


def test_controller_learns_rates_probes_and_switches_off_for_big_batches():
    c = linear(6, 0.3, probe_every=4)
    c.disable_batch_size = 4
    for _ in range(10):
        c.observe("good", 4, 4)
        c.observe("bad", 4, 0)
    assert min(c.rates("good")) > 0.85 and c.rates("bad")[0] < 0.2
    assert c.num_to_propose("good", 1, False) >= 4
    bad = [c.num_to_propose("bad", 1, False) for _ in range(8)]
    assert bad.count(0) == 6 and bad.count(1) == 2  # probes every 4th step
    assert c.num_to_propose("good", 4, False) == 0  # batch too large
    assert c.num_to_propose("good", 4, True) > 0  # seeded sampling keeps its stream
    c.forget(["good"])
    assert c.rates("good") == (c.prior_first, c.prior_next)


def test_controller_backs_off_probing_a_draft_that_never_agrees():
    # proposals never pay at this cost, so every proposal is a probe
    c = linear(4, 0.0, proposal_cost=1.0, probe_every=4, max_probe_every=16)

    def probe_steps(n, accept):
        steps = []
        for i in range(n):
            k = c.num_to_propose("r", 1, False)
            if k:
                steps.append(i)
                c.observe("r", k, k if accept else 0)
        return steps

    rejected = probe_steps(60, accept=False)
    assert rejected[0] == 3  # the first after probe_every steps
    assert [b - a for a, b in zip(rejected, rejected[1:])] == [8, 16, 16, 16]  # doubling, capped
    c.observe("r", 0, 0)  # nothing proposed: no effect
    accepted = probe_steps(40, accept=True)
    # an accepted probe brings the interval back to probe_every
    assert [b - a for a, b in zip(accepted, accepted[1:])] == [4] * (len(accepted) - 1)
    assert len(accepted) >= 6


def test_draft_kv_share_counts_each_cache_in_its_own_dtype():
    """A separate draft keeps a cache for every block: the target gets its share of the budget
    by bytes per token, in the KV dtype each cache is really stored in."""
    from types import SimpleNamespace

    from turbollm.model_arch import ModelArch
    from turbollm.worker.draft import draft_kv_share
    arch = ModelArch(model_type="llama", hidden_size=64, intermediate_size=128,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=100)
    small = ModelArch(model_type="llama", hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=100)
    assert draft_kv_share(arch, torch.float32, None) == 1.0
    bf16_draft = SimpleNamespace(arch=arch, dtype=torch.bfloat16)
    assert draft_kv_share(arch, torch.float32, bf16_draft) == pytest.approx(2 / 3)
    assert draft_kv_share(arch, torch.float32, bf16_draft, "int8") == pytest.approx(0.5)
    assert draft_kv_share(arch, torch.bfloat16, SimpleNamespace(arch=small, dtype=torch.bfloat16)) \
        == pytest.approx(0.8)

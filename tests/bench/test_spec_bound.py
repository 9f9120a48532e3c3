"""The n-gram speed-up bounds: traces, the oracle's shortest path, the controller replay."""
import itertools

import pytest

from turbollm.bench.spec_bound import (bounds_report, controller_cost, ngram_trace,
                                       oracle_cost, scaled_costs, speedup_bounds)

COSTS = [1.0, 1.5, 2.1, 2.5, 2.9]  # the shape measured on the 2-core CPU (k = 0..4)


def test_trace_counts_the_matching_prefix_of_each_proposal():
    prompt = [1, 2, 3, 4, 5, 9]
    answer = [2, 3, 4, 7, 8]
    trace = ngram_trace(prompt, answer, max_k=3)
    # t=0: suffix [9] never seen before -> nothing; t=1: [2] -> proposes 3 4 5, answer 3 4 7;
    # t=2: [2 3] -> 4 5 9 vs 4 7 8; t=3: [2 3 4] -> 5 9 2 vs 7 8; t=4: [7] unseen
    assert trace == [(0, 0), (3, 2), (3, 1), (3, 0), (0, 0)]


def test_oracle_cost_is_plain_when_nothing_is_accepted():
    trace = [(4, 0)] * 10
    assert oracle_cost(trace, COSTS) == pytest.approx(10.0)


def test_oracle_with_free_verification_takes_whole_runs():
    trace = [(4, 4)] * 10  # every proposal right: steps of 5 tokens
    assert oracle_cost(trace, [1.0] * 5) == pytest.approx(2.0)


def _brute_force(trace, costs):
    """Cheapest cost over every sequence of k choices (small traces only)."""
    best = float("inf")
    for ks in itertools.product(range(len(costs)), repeat=len(trace)):
        t, cost = 0, 0.0
        for k in ks:
            if t >= len(trace):
                break
            length, accepted = trace[t]
            v = min(k, length)
            cost += costs[v]
            t += min(v, accepted) + 1
        if t >= len(trace):
            best = min(best, cost)
    return best


@pytest.mark.parametrize("trace", [
    [(4, 1), (4, 4), (4, 4), (4, 0), (2, 2), (4, 3)],
    [(4, 0), (1, 1), (4, 2), (4, 4), (0, 0), (4, 4)],
    [(3, 3), (3, 1), (4, 0), (4, 4), (4, 2), (2, 0)],
])
def test_oracle_cost_is_the_cheapest_sequence_of_choices(trace):
    assert oracle_cost(trace, COSTS) == pytest.approx(_brute_force(trace, COSTS))


def test_controller_never_beats_the_oracle_and_gains_on_copying():
    costs = [1.0, 1.1, 1.2, 1.3, 1.4]
    copying = [(4, 4)] * 40
    assert oracle_cost(copying, costs) <= controller_cost(copying, costs) < 40
    mixed = [(4, 0), (4, 1), (4, 4), (4, 4), (4, 0), (0, 0)] * 6
    assert oracle_cost(mixed, costs) <= controller_cost(mixed, costs)


def test_speedup_bounds_on_a_copied_answer():
    prompt = list(range(100, 160))
    answer = list(range(120, 150))  # the answer quotes the prompt
    res = speedup_bounds([prompt], [answer], COSTS)
    assert res["oracle_free_verification"] >= res["oracle"] >= res["controller"] > 1.0
    assert res["per_answer_oracle"] == [pytest.approx(res["oracle"])]


def test_scaled_costs_keep_a_plain_step_and_scale_the_rest():
    assert scaled_costs(COSTS, 0.5) == pytest.approx([1.0, 1.25, 1.55, 1.75, 1.95])
    assert scaled_costs(COSTS, 0.0) == [1.0] * len(COSTS)


def test_bounds_report_takes_the_first_token_as_context_and_sweeps_cheaper_verification():
    prompt = list(range(100, 160))
    output = list(range(120, 150))
    report = bounds_report([prompt], [output], COSTS, scales=(0.5, 0.0))
    # the first output token (from the prefill) is not counted: 29 speculated positions
    assert report == {**report, **speedup_bounds([prompt + output[:1]], [output[1:]], COSTS)}
    cheaper = report["cheaper_verification"]
    assert [c["scale"] for c in cheaper] == [0.5, 0.0]
    assert report["oracle"] <= cheaper[0]["oracle"] <= cheaper[1]["oracle"]
    assert cheaper[1]["oracle"] == pytest.approx(report["oracle_free_verification"])

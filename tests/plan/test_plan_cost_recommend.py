"""Cost per token and request, API comparison, and the SLO search."""
import pytest

from turbollm.plan.cost_model import ApiPrice, Slo, estimate
from turbollm.plan.hardware import CATALOG
from turbollm.plan.models import load_model
from turbollm.plan.recommend import precision_options, recommend
from turbollm.plan.setup import Setup, Workload

_, L8 = load_model("Llama-3-8B")
_, L70 = load_model("Llama-2-70B")
H100 = CATALOG["H100-SXM"]


def test_cost_splits_machine_time_between_prompt_and_completion_tokens():
    w = Workload(512, 313, 8)
    e = estimate(Setup(L70, H100, 2), w, api=ApiPrice(1.0, 3.0))
    per_s = 2 * 2.99 / 3600
    assert e.cost.price_per_hour == pytest.approx(5.98)
    assert e.cost.per_request == pytest.approx(per_s * e.e2e_s / 8)
    assert e.cost.per_1k_prompt == pytest.approx(per_s * e.ttft_s / (8 * 512) * 1000)
    # prompt and completion shares add up to the request
    total = (512 * e.cost.per_1k_prompt + 313 * e.cost.per_1k_completion) / 1000
    assert total == pytest.approx(e.cost.per_request)
    assert e.cost.api_per_request == pytest.approx((512 * 1.0 + 313 * 3.0) / 1e6)
    assert e.cost.api_ratio == pytest.approx(e.cost.per_request / e.cost.api_per_request)
    assert e.e2e_s == pytest.approx(e.ttft_s + 312 * e.tpot_s)


def test_slo_checks_every_target_given():
    assert Slo(e2e_s=5).met_by(ttft=1, tpot=0.01, e2e=4.9)
    assert not Slo(e2e_s=5, ttft_s=0.5).met_by(ttft=1, tpot=0.01, e2e=4.9)
    assert Slo().empty and not Slo(tpot_s=0.05).empty


def test_recommend_finds_the_cheapest_setup_meeting_the_slo():
    w = Workload(512, 313, 1)
    slo = Slo(e2e_s=5.0)
    gpus = [CATALOG[n] for n in ("H100-SXM", "A100-80GB", "L4", "A10G")]
    cands = recommend(L8, w, slo, gpus, gpu_counts=(1, 2))
    assert cands
    costs = [c.cost_per_request for c in cands]
    assert costs == sorted(costs)
    for c in cands:
        assert c.estimate.e2e_s <= 5.0 and c.estimate.memory.fits
    # no configuration is listed twice, and the winner beats every option at batch 1
    assert len({c.key for c in cands}) == len(cands)
    best = cands[0]
    for gpu in gpus:
        for prec in precision_options():
            e = estimate(Setup(L8, gpu, 1, prec), w)
            if e.meets(slo):
                assert best.cost_per_request <= e.cost.per_request


def test_recommend_returns_nothing_for_an_impossible_slo_or_unpriced_gpus():
    w = Workload(512, 313, 1)
    assert recommend(L8, w, Slo(e2e_s=0.01), [H100]) == []
    from dataclasses import replace
    assert recommend(L8, w, Slo(e2e_s=60), [replace(H100, price_per_hour=0)]) == []


def test_llama2_70b_bf16_is_only_recommended_on_several_80gb_gpus():
    w = Workload(512, 313, 1)
    cands = recommend(L70, w, Slo(e2e_s=30), [H100], precisions=precision_options()[:1])
    assert cands and all(c.estimate.setup.n_gpus >= 2 for c in cands)

"""The verification cost table the engine measures at start-up for the speculation controller."""
import logging

import pytest

from turbollm import LLM, SamplingParams
from turbollm.config import SpeculativeConfig
from turbollm.spec_decode.step_cost import interpolate, linear_costs, probe_ks

ENGINE = dict(dtype="float32", num_threads=2, kv_cache_memory="16MiB")


def test_probe_ks_double_up_to_max_k():
    assert probe_ks(8) == [0, 1, 2, 4, 8]
    assert probe_ks(6) == [0, 1, 2, 4, 6]
    assert probe_ks(1) == [0, 1]


def test_interpolate_is_linear_between_points_and_never_decreases():
    costs = interpolate({0: 1.0, 1: 1.8, 2: 1.7, 4: 2.5}, 4)
    # a noisy point below its neighbour is raised to it; k = 3 lies halfway from 2 to 4
    assert costs == pytest.approx([1.0, 1.8, 1.8, 2.1, 2.5])
    assert linear_costs(3, 0.5) == [1.0, 1.5, 2.0, 2.5]


def test_verify_cost_is_validated():
    assert SpeculativeConfig(speculative_method="ngram", verify_cost="0.3").verify_cost == "0.3"
    for bad in ("cheap", "-1"):
        with pytest.raises(ValueError, match="verify_cost"):
            SpeculativeConfig(speculative_method="ngram", verify_cost=bad)


def test_engine_measures_its_verification_steps_and_leaves_no_trace(tiny_llama):
    llm = LLM(str(tiny_llama), speculative_method="ngram", num_speculative_tokens=4, **ENGINE)
    eng = llm.engine
    costs = eng.spec.controller.step_costs
    assert len(costs) == 5 and costs[0] == 1.0
    assert all(b >= a for a, b in zip(costs, costs[1:]))
    assert costs != linear_costs(4, 0.25)  # measured, not the fallback
    # the probe request is gone and counted nowhere
    assert not eng.has_unfinished_requests() and eng.stats.steps == 0
    assert eng.stats.prompt_tokens == eng.stats.generation_tokens == 0
    assert eng.spec.num_spec_steps == eng.spec.num_draft_tokens == 0
    eng.kv_manager.check_invariant()
    assert eng.kv_manager.pool.num_used == 0
    out = llm.generate(["hello"], SamplingParams(max_tokens=5, temperature=0.0,
                                                 ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5


def test_a_given_verify_cost_skips_the_probe(tiny_llama):
    llm = LLM(str(tiny_llama), speculative_method="ngram", num_speculative_tokens=3,
              verify_cost="0.5", **ENGINE)
    assert llm.engine.spec.controller.step_costs == linear_costs(3, 0.5)


def test_no_room_for_the_probe_keeps_the_fallback(tiny_llama, caplog):
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(tiny_llama), speculative_method="ngram", num_speculative_tokens=4,
                  max_model_len=24, **ENGINE)
    assert llm.engine.spec.controller.step_costs == linear_costs(4, 0.25)
    assert "no room to time verification steps" in caplog.text

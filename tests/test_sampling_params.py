"""SamplingParams validation and normalization."""

import math

import pytest

from turbollm.sampling_params import SamplingParams

INVALID = [
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", -1.0),
    ("temperature", True),
    ("temperature", "0.5"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 1.5),
    ("min_p", 2.0),
    ("min_p", -0.1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -3.0),
    ("n", 0),
    ("n", True),
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("logprobs", -1),
    ("prompt_logprobs", -1),
    ("seed", 1.5),
    ("seed", 2**64),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", [1]),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", 7),
    ("logit_bias", {5: 101.0}),
    ("logit_bias", {5: math.nan}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", [1, 2]),
    ("ignore_eos", 1),
    ("skip_special_tokens", None),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_raises_naming_parameter(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_error_message_shows_value():
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0.0, got nan"):
        SamplingParams(temperature=math.nan)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
    # Without a max_tokens bound any min_tokens is allowed.
    assert SamplingParams(min_tokens=100, max_tokens=None).min_tokens == 100


def test_stop_needs_detokenize():
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)


def test_defaults_and_normalization():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1.0, 1.0, 0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "bcd")).max_stop_len == 3
    assert SamplingParams(top_k=-1).top_k == 0
    assert isinstance(SamplingParams(temperature=1).temperature, float)
    assert SamplingParams(logit_bias={"50": -100}).logit_bias == {50: -100.0}


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_clone_is_deep_and_replace_revalidates():
    p = SamplingParams(stop=["a"], logit_bias={1: 2.0})
    q = p.clone()
    q.stop.append("b")
    q.logit_bias[3] = 1.0
    assert p.stop == ["a"] and p.logit_bias == {1: 2.0}
    r = p.replace(temperature=0.0, stop=["longer"])
    assert r.greedy and r.max_stop_len == 6 and p.temperature == 1.0
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=0.0)

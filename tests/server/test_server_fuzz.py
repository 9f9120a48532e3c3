"""Property-based fuzz of the request bodies: a few hundred requests of plausible and
nonsense fields; never a 5xx, and the server is still ready (and holds no KV) afterwards."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from turbollm.server.config import ServerConfig

from conftest import MODEL_NAME

# Any JSON value (big ints, deep-ish nesting, odd strings including surrogate-free unicode).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=8)

small_text = st.text(max_size=40)
token_ids = st.lists(st.integers(0, 49151), min_size=1, max_size=8)
bad_ids = st.lists(st.integers(-5, 60_000), max_size=8)
roles = st.sampled_from(["system", "user", "assistant", "developer"])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": small_text}),
                    min_size=1, max_size=3)

# field -> (valid values, invalid or odd values)
FIELDS = {
    "model": (st.just(MODEL_NAME), st.sampled_from(["other", "", "tiny "])),
    "max_tokens": (st.integers(1, 8) | st.none(), st.integers(-3, 0) | st.integers(100, 2**40)),
    "max_completion_tokens": (st.integers(1, 8), st.integers(-3, 0)),
    "temperature": (st.floats(0, 2), st.floats(-3, -0.001)),
    "top_p": (st.floats(0.01, 1), st.floats(-0.5, 0) | st.floats(1.001, 9)),
    "top_k": (st.integers(-1, 100), st.integers(-9, -2)),
    "min_p": (st.floats(0, 1), st.floats(1.01, 3)),
    "seed": (st.integers(0, 2**63), st.integers(2**64, 2**66)),
    "n": (st.integers(1, 4), st.integers(-1, 0) | st.integers(17, 10**6)),
    "presence_penalty": (st.floats(-2, 2), st.floats(2.01, 9)),
    "frequency_penalty": (st.floats(-2, 2), st.floats(-9, -2.01)),
    "repetition_penalty": (st.floats(0.5, 2), st.floats(-1, 0)),
    "stop": (small_text.filter(bool) | st.lists(st.text(min_size=1, max_size=8), max_size=3),
             st.lists(st.text(max_size=300), min_size=17, max_size=20) | st.just([""])),
    "stop_token_ids": (token_ids, bad_ids),
    "ignore_eos": (st.booleans(), st.integers()),
    "min_tokens": (st.integers(0, 2), st.integers(-2, -1) | st.integers(9, 20)),
    "logit_bias": (st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100),
                                   max_size=3),
                   st.dictionaries(st.text(max_size=6), st.floats(-200, 200), max_size=3)),
    "stream": (st.booleans(), st.sampled_from(["yes", 1])),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "user": (small_text, st.integers()),
    "logprobs": (st.integers(0, 5), st.integers(21, 10**9)),
    "echo": (st.booleans(), st.just("no")),
    "top_logprobs": (st.integers(0, 5), st.integers(21, 99)),
    "chat_template": (st.none(), small_text),
    "suffix": (st.none(), small_text),
    "best_of": (st.none(), st.integers(2, 5)),
    "tools": (st.none(), st.lists(json_values, min_size=1, max_size=2)),
    "parameters": (st.fixed_dictionaries({}, optional={
        "max_new_tokens": st.integers(1, 10), "temperature": st.floats(0.01, 3),
        "top_p": st.floats(0.01, 1), "top_k": st.integers(1, 50), "do_sample": st.booleans(),
        "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3),
        "seed": st.integers(0, 2**64 - 1), "repetition_penalty": st.floats(0.5, 2),
        "details": st.booleans(), "return_full_text": st.booleans()}),
        st.fixed_dictionaries({}, optional={
            "max_new_tokens": st.integers(-2, 0) | st.integers(10**5, 10**7),
            "temperature": st.floats(-1, 0), "top_p": st.floats(1.01, 2),
            "top_k": st.integers(-2, 0), "seed": st.integers(-3, -1),
            "stop": st.lists(st.text(max_size=300), min_size=17, max_size=18)})),
}
COMMON = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "stop",
          "stop_token_ids", "ignore_eos", "min_tokens", "logit_bias", "stream",
          "stream_options", "user"]
ENDPOINTS = {
    "/v1/completions": ("prompt", st.text(min_size=1, max_size=40) | token_ids
                        | st.lists(token_ids, min_size=1, max_size=3),
                        COMMON + ["logprobs", "echo", "suffix", "best_of"]),
    "/v1/chat/completions": ("messages", messages,
                             COMMON + ["max_completion_tokens", "logprobs", "top_logprobs",
                                       "chat_template", "tools"]),
    "/generate": ("inputs", st.text(min_size=1, max_size=40), ["parameters"]),
    "/generate_stream": ("inputs", st.text(min_size=1, max_size=40), ["parameters"]),
}


@st.composite
def requests(draw):
    """(path, raw body): usually a valid request with a few odd fields, sometimes junk."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    if draw(st.integers(0, 15)) == 0:
        return path, draw(st.binary(max_size=64))
    required, valid_required, names = ENDPOINTS[path]
    body: dict = {}
    if draw(st.integers(0, 9)):
        body[required] = draw(valid_required)
    elif draw(st.booleans()):
        body[required] = draw(json_values)
    for name in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
        valid, invalid = FIELDS[name]
        roll = draw(st.integers(0, 7))
        body[name] = draw(json_values if roll == 0 else invalid if roll == 1 else valid)
    if draw(st.integers(0, 9)) == 0:  # an unknown field: ignored, like OpenAI does
        body[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return path, json.dumps(body).encode()


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama):
    from conftest import start_server
    # A short context keeps every accepted request small, whatever max_tokens and n say.
    live = start_server(tiny_llama, ServerConfig(port=0), max_model_len=64, max_num_seqs=32)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(fuzz_server):
    with httpx.Client(base_url=fuzz_server.base_url, timeout=60) as client:
        yield client


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(req=requests())
def test_fuzz_never_5xx(http, req):
    path, raw = req
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
    event(f"{path} -> {r.status_code}")
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("application/json"):
        body = r.json()
        assert "choices" in body or "generated_text" in body
    else:
        assert "engine_error" not in r.text and '"error"' not in r.text, r.text[:300]


def test_after_fuzz_server_ready_and_clean(fuzz_server, http):
    assert http.get("/ready").status_code == 200
    fuzz_server.wait_idle()
    fuzz_server.assert_no_blocks_held()

"""Speculative decoding behind the HTTP server: acceptance in the response's usage and in
/metrics, and the same greedy text as a server without speculation."""
import httpx
from conftest import MODEL_NAME


def _metric(text: str, name: str) -> float:
    return float([line for line in text.splitlines() if line.startswith(name + " ")][0].split()[-1])


def test_ngram_server_reports_acceptance_and_matches_plain(server, make_server_fixture):
    spec = make_server_fixture(speculative_method="ngram", num_speculative_tokens=4)
    body = {"model": MODEL_NAME, "prompt": "one two three one two three one two",
            "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    got = httpx.post(spec.base_url + "/v1/completions", json=body, timeout=60).json()
    ref = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).json()
    assert got["choices"][0]["text"] == ref["choices"][0]["text"]
    assert "speculative" not in ref["usage"]
    s = got["usage"]["speculative"]
    assert s["draft_tokens"] > 0 and 0 <= s["accepted_tokens"] <= s["draft_tokens"]
    assert s["acceptance_rate"] == s["accepted_tokens"] / s["draft_tokens"]
    assert s["mean_accepted_length"] == 1 + s["accepted_tokens"] / s["steps"]
    assert got["usage"]["completion_tokens"] == 24
    spec.wait_idle()
    text = httpx.get(spec.base_url + "/metrics").text
    assert _metric(text, "turbollm_spec_decode_draft_tokens_total") == s["draft_tokens"]
    assert _metric(text, "turbollm_spec_decode_accepted_tokens_total") == s["accepted_tokens"]
    assert _metric(text, "turbollm_spec_decode_steps_total") == s["steps"]
    rate = _metric(text, "turbollm_spec_decode_acceptance_rate")
    assert abs(rate - s["acceptance_rate"]) < 1e-9
    spec.assert_no_blocks_held()

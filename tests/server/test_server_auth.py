"""API key, path tricks, CORS, health/ready and /metrics."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from turbollm.server.config import ServerConfig

from conftest import MODEL_NAME, assert_error_shape, raw_http

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def secured(tiny_llama):
    from conftest import start_server
    live = start_server(tiny_llama, ServerConfig(port=0, api_key=KEY,
                                                 allowed_origins="https://ok.example"),
                        max_num_seqs=4)
    yield live
    live.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}
PROTECTED = [("GET", "/v1/models"), ("GET", "/v1/models/tiny"),
             ("GET", "/metrics"), ("GET", "/openapi.json"), ("POST", "/v1/completions"),
             ("POST", "/v1/chat/completions"), ("POST", "/generate"),
             ("POST", "/generate_stream")]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_every_route_but_health_and_ready_needs_the_key(secured, method, path):
    r = httpx.request(method, secured.base_url + path, json={})
    assert_error_shape(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.request(method, secured.base_url + path, json={},
                      headers={"Authorization": "Bearer wrong"})
    assert_error_shape(r, 401)
    r = httpx.request(method, secured.base_url + path, json={}, headers=AUTH)
    assert r.status_code != 401


def test_health_and_ready_are_open(secured):
    """Load balancers probe both without credentials; they tell only the engine's state."""
    assert httpx.get(secured.base_url + "/health").status_code == 200
    r = httpx.get(secured.base_url + "/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_openai_client_with_key(secured):
    client = openai.OpenAI(base_url=secured.base_url + "/v1", api_key=KEY, max_retries=0)
    r = client.chat.completions.create(model=MODEL_NAME, max_tokens=3,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None
    bad = openai.OpenAI(base_url=secured.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("path", [
    b"//v1/models", b"/v1//models", b"/v1/models/", b"/health/../v1/models",
    b"/v1/%2E%2E/health", b"/v1%2Fmodels", b"/%761/models", b"/health/..%2Fv1/models",
    b"/./v1/models", b"/v1/models?x=/health", b"/V1/MODELS", b"/health%00/../v1/models",
])
def test_path_tricks_never_bypass_auth(secured, path):
    status, body = raw_http(secured.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
                            b"Connection: close\r\n\r\n")
    # Either the router matched a protected route (401) or nothing (404 / 307 redirect to
    # a path that is itself protected); never the data.
    assert status in (400, 401, 404, 307), (path, status, body[:200])
    assert b'"data"' not in body


def test_cors_only_when_configured(server, secured):
    origin = {"Origin": "https://ok.example"}
    r = httpx.get(server.base_url + "/health", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(server.base_url + "/v1/models", headers={
        **origin, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(secured.base_url + "/health", headers=origin)
    assert r.headers["access-control-allow-origin"] == "https://ok.example"
    r = httpx.get(secured.base_url + "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(secured.base_url + "/v1/completions", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://ok.example"


def test_health_ready_and_openapi(server):
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.base_url + "/ready").json() == {"status": "ready"}
    schema = httpx.get(server.base_url + "/openapi.json").json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("CompletionRequest")
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


def test_metrics(server):
    r = httpx.post(server.base_url + "/v1/completions", json={
        "model": MODEL_NAME, "prompt": "metrics please", "max_tokens": 5})
    assert r.status_code == 200
    httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 0})
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("turbollm_http_requests_total", "turbollm_time_to_first_token_seconds_bucket",
                 "turbollm_time_per_output_token_seconds_bucket",
                 "turbollm_e2e_request_latency_seconds_bucket", "turbollm_num_requests_running",
                 "turbollm_num_requests_waiting", "turbollm_kv_cache_usage_ratio",
                 "turbollm_prefix_cache_hit_rate", "turbollm_prompt_tokens_total",
                 "turbollm_generation_tokens_total", "turbollm_preemptions_total",
                 "turbollm_requests_finished_total"):
        assert name in text, name
    assert 'turbollm_http_requests_total{route="/v1/completions",status="200"}' in text
    assert 'turbollm_http_requests_total{route="/v1/completions",status="400"}' in text
    from turbollm.native_build import selected_isa
    system = next(line for line in text.splitlines() if line.startswith("turbollm_system_info"))
    assert f'isa="{selected_isa() or "none (torch kernels)"}"' in system and 'cpu="' in system
    gen = [line for line in text.splitlines()
           if line.startswith("turbollm_generation_tokens_total")]
    assert float(gen[0].split()[-1]) >= 5
    # Random paths do not create label values (bounded cardinality).
    httpx.get(server.base_url + "/random/path/abc123")
    text = httpx.get(server.base_url + "/metrics").text
    assert "abc123" not in text and 'route="unmatched"' in text


def test_no_pickle_or_eval_surface(server):
    # Bodies are JSON only: other content types are parsed as JSON (and fail as such).
    r = httpx.post(server.base_url + "/v1/completions", content=b"\x80\x04\x95",
                   headers={"Content-Type": "application/python-pickle"})
    assert_error_shape(r, 400)
    assert json.loads(r.text)["error"]["code"] in ("invalid_encoding", "invalid_json")

"""`turbollm bench serve` against a live local server: its counts equal the server's /metrics."""
import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


def _server_helpers():
    """tests/server/conftest.py's start_server (the real app under uvicorn, in a thread)."""
    path = Path(__file__).parents[1] / "server" / "conftest.py"
    spec = importlib.util.spec_from_file_location("bench_serve_server_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def live(tiny_llama):
    server = _server_helpers().start_server(tiny_llama)
    yield server
    server.stop()


def _metrics(url: str) -> dict:
    """{(sample name, labels as a sorted tuple): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def _run(live, tiny_llama, tmp_path, *extra) -> tuple[dict, dict, dict]:
    from turbollm.cli import main
    before = _metrics(live.base_url)
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--base-url", live.base_url, "--tokenizer", str(tiny_llama),
                 "--json", str(out), "--plot-dir", str(tmp_path), "--no-progress",
                 *extra]) == 0
    live.wait_idle()
    return json.loads(out.read_text()), before, _metrics(live.base_url)


def _check_counts(res: dict, before: dict, after: dict, route: str) -> None:
    s = res["summary"]
    http = "turbollm_http_requests_total"
    assert s["completed"] == _delta(before, after, http, route=route, status="200")
    for status, n in s["errors_by_status"].items():
        assert n == _delta(before, after, http, route=route, status=status), status
    assert s["output_tokens"] == _delta(before, after, "turbollm_generation_tokens_total")
    assert s["prompt_tokens"] == _delta(before, after, "turbollm_prompt_tokens_total")


def test_closed_loop_counts_match_server_metrics(live, tiny_llama, tmp_path):
    """Synthetic prompts around the tiny model's 512-token context: the longer ones are refused
    (400), and every count the client reports equals what the server counted."""
    res, before, after = _run(live, tiny_llama, tmp_path, "--num-prompts", "8", "--input-len",
                              "480", "--output-len", "12", "--range-ratio", "0.08",
                              "--concurrency", "3", "--seed", "1")
    s = res["summary"]
    assert s["requests"] == 8 and s["completed"] + s["failed"] == 8
    assert s["completed"] >= 1 and s["errors_by_status"].get("400", 0) >= 1
    assert set(s["errors_by_status"]) == {"400"}
    _check_counts(res, before, after, "/v1/completions")
    ok = [r for r in res["requests"] if r["ok"]]
    assert all(r["output_tokens"] == r["requested_tokens"] for r in ok)  # ignore_eos
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        d = s[key]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"], (key, d)
    assert s["ttft_s"]["p50"] <= s["e2e_s"]["p50"]
    assert s["requests_per_s"] > 0 and s["output_tok_s"] > 0
    # One gap per SSE event after the first, so at most a gap per token; fewer where the
    # server coalesced tokens for a reader that fell behind (a loaded machine), never none for
    # a 12-token answer streamed over several steps.
    assert all(1 <= len(r["itl_s"]) <= r["output_tokens"] - 1 for r in ok)
    assert (tmp_path / "serve_latency.png").read_bytes()[:4] == b"\x89PNG"


def test_open_loop_chat_on_corpus_prompts(live, tiny_llama, tmp_path):
    res, before, after = _run(live, tiny_llama, tmp_path, "--endpoint", "chat", "--dataset",
                              "corpus", "--num-prompts", "5", "--input-len", "120",
                              "--output-len", "8", "--request-rate", "40", "--seed", "2")
    s = res["summary"]
    assert s["completed"] == 5 and s["failed"] == 0
    assert s["prompt_tokens"] > 5 * 120  # passage + task + chat template
    _check_counts(res, before, after, "/v1/chat/completions")


def test_unreachable_server_counts_transport_errors(tiny_llama, tmp_path):
    from turbollm.bench.serve import ServeRequest, run_load, summarize
    import asyncio
    reqs = [ServeRequest([1, 2, 3], "a b c", 3, 4)] * 2
    results, wall, _ = asyncio.run(run_load("http://127.0.0.1:9", reqs, model="m",
                                            concurrency=2, progress=False, timeout=5))
    s = summarize(results, wall)
    assert s["failed"] == 2 and s["errors_by_status"] == {"transport": 2}

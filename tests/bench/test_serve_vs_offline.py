"""`turbollm bench serve-vs-offline`'s offline side and its reading of the server's /metrics."""
from types import SimpleNamespace

import pytest

from turbollm.bench.serve import ServeRequest, summarize
from turbollm.bench.serve_vs_offline import (client_means, format_table, offline_load,
                                             server_means)
from turbollm.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine.from_kwargs(model=str(tiny_llama), dtype="float32",
                                 kv_cache_memory="32MiB", max_model_len=256)


def test_offline_closed_loop_times_every_request(engine):
    reqs = [ServeRequest([5 + i, 6, 7, 8], "", 4, 3 + i) for i in range(5)]
    results, wall = offline_load(engine, reqs, concurrency=2, stagger_s=0.01)
    assert all(r.ok for r in results)
    assert [r.output_tokens for r in results] == [3, 4, 5, 6, 7]  # ignore_eos: exact lengths
    for r in results:
        assert 0 < r.ttft_s <= r.e2e_s <= wall
        assert len(r.itl_s) == r.output_tokens - 1  # one event per step with a new token
    s = summarize(results, wall)
    assert s["output_tokens"] == 25 and s["completed"] == 5
    assert not engine.has_unfinished_requests()


def test_a_client_that_has_not_started_takes_no_request(engine):
    reqs = [ServeRequest([5 + i, 6, 7], "", 3, 3) for i in range(3)]
    results, wall = offline_load(engine, reqs, concurrency=2, stagger_s=600.0)
    assert wall < 600  # the first client ran all three, one after the other
    for a, b in zip(results, results[1:]):
        assert b.start >= a.start + a.e2e_s


def test_server_means_are_the_histogram_deltas():
    def text(ttft_sum, ttft_n, tpot_sum, tpot_n):
        return ("# TYPE turbollm_time_to_first_token_seconds histogram\n"
                f"turbollm_time_to_first_token_seconds_sum {ttft_sum}\n"
                f"turbollm_time_to_first_token_seconds_count {ttft_n}\n"
                "# TYPE turbollm_time_per_output_token_seconds histogram\n"
                f"turbollm_time_per_output_token_seconds_sum {tpot_sum}\n"
                f"turbollm_time_per_output_token_seconds_count {tpot_n}\n")
    m = server_means(text(1.0, 2, 0.5, 2), text(1.9, 5, 0.56, 5))
    assert m["ttft"] == pytest.approx(0.3) and m["tpot"] == pytest.approx(0.02)
    assert server_means(text(1, 2, 1, 2), text(1, 2, 1, 2)) == {"ttft": None, "tpot": None}


def test_the_table_puts_served_and_offline_side_by_side(engine):
    reqs = [ServeRequest([9, 10, 11], "", 3, 4) for _ in range(2)]
    results, wall = offline_load(engine, reqs, concurrency=1, stagger_s=0.0)
    s = summarize(results, wall)
    row = {"clients": 1, "requests": 2, "served": s, "offline": s,
           "server_metrics": client_means(results), "client_metrics": client_means(results)}
    args = SimpleNamespace(stream=True, input_len=3, output_len=4, stagger=0.0)
    table = format_table([row], args, "tiny")
    assert f"| 1 | 2 | {s['output_tok_s']:.1f} | {s['output_tok_s']:.1f} | 1.00x |" in table
    assert "TTFT server" in table

"""Reading llama-benchy 0.4.0's output and the serve-vs-peer table (scripts/serve_peers.py).

The fixtures are llama-benchy's real files from one short run of
`scripts/serve_peers.py --concurrency 1 2 --prompt-tokens 64 --max-tokens 16 --runs 1` (2 threads,
a Sapphire Rapids VM; answers of 16 tokens: samples of the format, not measurements).
"""
import json
from pathlib import Path

import pytest

from turbollm.bench.benchy_report import (AnswerCheck, ConcurrencyResult, answer_warnings,
                                          format_table, machine_line, parse_progress,
                                          parse_report)

FIXTURES = Path(__file__).parent / "fixtures" / "llama_benchy_0.4.0"


def _read(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_report_gives_decode_rate_and_ttft_per_concurrency():
    ours = parse_report(_read("turbollm.json"))
    assert sorted(ours) == [1, 2]
    assert ours[1] == ConcurrencyResult(1, pytest.approx(208.732970004049),
                                        pytest.approx(85.82946000024094))
    assert ours[2].decode_tok_s == pytest.approx(148.66474086927778)
    assert ours[2].ttft_ms == pytest.approx(149.14069400037988)
    peer = parse_report(_read("llama-cpp-python.json"))
    assert peer[1].decode_tok_s == pytest.approx(83.92049426113961)
    assert peer[2].ttft_ms == pytest.approx(525.5755354992289)


def test_report_skips_context_phase_and_refuses_two_tests_at_one_concurrency():
    report = json.loads(_read("turbollm.json"))
    context_phase = dict(report["benchmarks"][0], is_context_prefill_phase=True,
                         tg_throughput={"mean": 999.0, "std": 0.0, "values": [999.0]})
    with_context = dict(report, benchmarks=[context_phase, *report["benchmarks"]])
    parsed = parse_report(json.dumps(with_context))
    assert parsed[1].decode_tok_s == pytest.approx(208.732970004049)

    twice = dict(report, benchmarks=report["benchmarks"] + report["benchmarks"][:1])
    with pytest.raises(ValueError, match="concurrency 1"):
        parse_report(json.dumps(twice))


def test_missing_metric_is_none_not_zero():
    report = json.loads(_read("turbollm.json"))
    report["benchmarks"][0]["tg_throughput"] = None  # a run whose requests all failed
    assert parse_report(json.dumps(report))[1].decode_tok_s is None


def test_progress_counts_measured_answers_per_concurrency():
    checks = parse_progress(_read("turbollm.progress.jsonl"))
    # warm-up requests send no events: one measured request at c=1, two at c=2, 16 tokens each
    assert checks == {1: AnswerCheck(1, 1, 0, 16.0), 2: AnswerCheck(2, 2, 0, 16.0)}
    assert answer_warnings("turbollm", checks, max_tokens=16) == []


def test_short_or_failed_answers_are_reported():
    events = [
        {"type": "request_start", "request_id": 0, "concurrency": 4},
        {"type": "request_start", "request_id": 1, "concurrency": 4},
        {"type": "request_end", "request_id": 0, "total_tokens": 60, "error": ""},
        {"type": "request_end", "request_id": 1, "total_tokens": 0, "error": "HTTP 429: busy"},
    ]
    checks = parse_progress("\n".join(json.dumps(e) for e in events) + "\n")
    assert checks == {4: AnswerCheck(4, 2, 1, 60.0)}
    assert answer_warnings("peer", checks, max_tokens=128) == [
        "peer, 4 concurrent: 1 of 2 requests failed",
        "peer, 4 concurrent: answers averaged 60.0 tokens, not 128"]
    # within 10%: a re-tokenized count, not a short answer
    assert answer_warnings("peer", {1: AnswerCheck(1, 1, 0, 120.0)}, 128) == []


def test_table_has_a_row_per_requested_concurrency():
    ours = parse_report(_read("turbollm.json"))
    peer = parse_report(_read("llama-cpp-python.json"))
    assert format_table([1, 2, 4], ours, peer, "llama-cpp-python").splitlines() == [
        "| concurrency | turbollm decode tok/s | turbollm TTFT ms | llama-cpp-python decode tok/s "
        "| llama-cpp-python TTFT ms |",
        "|---:|---:|---:|---:|---:|",
        "| 1 | 208.7 | 86 | 83.9 | 159 |",
        "| 2 | 148.7 | 149 | 28.2 | 526 |",
        "| 4 | - | - | - | - |",  # asked for, not in the reports
    ]


def test_table_without_peer_says_not_run():
    ours = {1: ConcurrencyResult(1, 100.04, 12.6)}
    assert format_table([1], ours, None, "peer").splitlines()[2] == \
        "| 1 | 100.0 | 13 | not run | not run |"


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8
"""


def test_machine_line_names_cpu_wide_flags_threads_and_model():
    assert machine_line(CPUINFO, 2, "/m/SmolLM2.gguf") == (
        "CPU: Intel(R) Xeon(R) Platinum 8480+; flags: avx512f avx512bw avx512_vnni amx_tile "
        "amx_int8; threads: 2; model: /m/SmolLM2.gguf")
    avx2_only = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n"
    assert machine_line(avx2_only, 1, "m.gguf") == \
        "CPU: AMD EPYC 7B13; flags: no AVX-512, no AMX (AVX2); threads: 1; model: m.gguf"
    assert machine_line("", 4, "m.gguf").startswith("CPU: unknown CPU; flags: no AVX-512, no AMX;")

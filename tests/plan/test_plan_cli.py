"""The `turbollm plan` command: table, JSON, recommendation, charts, errors."""
import argparse
import json

import pytest

from turbollm.plan.cli import add_plan_parser, main, parse_api_price, parse_seconds


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_table_for_llama2_70b_on_two_h100(capsys):
    rc, out, _ = run(capsys, "--model", "Llama-2-70B", "--hardware", "H100-SXM", "--gpus", "2",
                     "--prompt-len", "512", "--completion-len", "313", "--batch", "4")
    assert rc == 0
    for text in ("327,680 B total", "fits                yes", "TTFT", "TPOT", "per 1K prompt",
                 "MFU         0.50", "MBU         0.75"):
        assert text in out


def test_json_output_is_complete(capsys):
    rc, out, _ = run(capsys, "--model", "Llama-2-70B", "--hardware", "h100-sxm", "--json",
                     "--api-price", "0.5,1.5")
    assert rc == 0
    d = json.loads(out)
    assert d["memory"]["kv_per_token"] == 327_680
    assert d["memory"]["fits"] is False
    assert d["setup"]["efficiency"]["mfu"] == 0.5
    assert d["prefill"]["bound"] in ("compute", "memory")
    assert d["cost"]["api_per_request"] > 0


def test_recommend_prints_a_ranked_table(capsys):
    rc, out, _ = run(capsys, "--model", "Llama-3-8B", "--recommend", "--slo-e2e", "5s",
                     "--gpu-types", "L4,H100-SXM", "--gpu-counts", "1,2", "--top", "3")
    assert rc == 0
    assert "Recommended:" in out and "E2E <= 5.00 s" in out
    rc, out, err = run(capsys, "--model", "Llama-3-8B", "--recommend")
    assert rc == 2 and "needs at least one" in err
    rc, out, _ = run(capsys, "--model", "Llama-3-8B", "--recommend", "--slo-tpot", "1us")
    assert rc == 1 and "No catalog configuration" in out


def test_plot_writes_pngs(capsys, tmp_path):
    rc, _, err = run(capsys, "--model", "SmolLM2-135M", "--hardware", "L4",
                     "--plot", str(tmp_path))
    assert rc == 0
    for name in ("latency_vs_batch.png", "cost_vs_batch.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lists_and_errors(capsys):
    rc, out, _ = run(capsys, "--list-gpus")
    assert rc == 0 and "RTX-4090" in out and "H200" in out
    rc, out, _ = run(capsys, "--list-models")
    assert rc == 0 and "Falcon-40B" in out
    rc, _, err = run(capsys, "--hardware", "tpu")
    assert rc == 2 and "unknown GPU" in err
    rc, _, err = run(capsys, "--model", "Falcon-7B", "--gpus", "2")
    assert rc == 2 and "attention heads" in err


def test_parsers_and_subcommand_registration():
    assert parse_seconds("5s") == 5 and parse_seconds("200ms") == pytest.approx(0.2)
    assert parse_seconds("0.5") == 0.5
    assert parse_api_price("0.5,1.5").completion_per_m == 1.5
    root = argparse.ArgumentParser(prog="turbollm")
    add_plan_parser(root.add_subparsers(dest="command"))
    args = root.parse_args(["plan", "--model", "Llama-3-8B", "--quant", "int4"])
    assert args.func.__name__ == "run_plan" and args.quant == "int4"

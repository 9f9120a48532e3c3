"""`turbollm bench` (offline matrix) on the tiny model: tables, JSON, charts, refusals."""
import json

import pytest

# Small sizes so each configuration takes about a second on the tiny model.
TINY_SPEC = ["prefill_tokens=48", "decode_tokens=6", "workloads=chat:24:6:2+rag:40:3:2:32",
             "batch_sizes=1+3", "batch_prompt_tokens=12", "batch_output_tokens=6",
             "ppl_tokens=120", "ppl_max_length=48", "ppl_stride=24", "agree_prompts=2",
             "agree_prompt_tokens=12", "agree_tokens=6"]


def _bench(tiny_llama, out, *extra):
    from turbollm.cli import main
    args = ["bench", "--model", str(tiny_llama), "--num-threads", "1", "--device", "cpu",
            "--out", str(out), "--no-progress", *extra]
    for s in TINY_SPEC:
        args += ["--set", s]
    assert main(args) == 0
    assert not (out / "results.partial.json").exists()  # only an interrupted run leaves it
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def _check_png(path):
    import matplotlib.image as mpimg
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_bench_matrix_in_process(tiny_llama, tmp_path, monkeypatch):
    """fp32 / bf16 measured, a technique the engine refuses and a bad option shown as not
    available (the run goes on), HF as a peer with ratios, llama.cpp reported as missing."""
    from turbollm.engine.llm_engine import LLMEngine
    real_init = LLMEngine.__init__

    def init(self, config):  # the engine's refusal of a technique not implemented (yet)
        if config.model.quantization == "gptq":
            raise ValueError("not available yet in this engine: quantization=gptq")
        real_init(self, config)
    monkeypatch.setattr(LLMEngine, "__init__", init)
    res, md = _bench(tiny_llama, tmp_path, "--no-isolate", "--configs", "fp32,bf16,gptq",
                     "--add-config", "badgroup:quantization_group_size=7",
                     "--peers", "hf,llamacpp")
    rows = {r["name"]: r for r in res["results"]}
    assert list(rows) == ["fp32", "bf16", "gptq", "badgroup", "hf-fp32", "llamacpp"]
    for name in ("fp32", "bf16", "hf-fp32"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
        assert [b["batch"] for b in r["batch"]] == [1, 3]
        assert all(b["tok_s"] > 0 and b["e2e_s"] > 0 for b in r["batch"])
        assert set(r["workloads"]) == {"chat", "rag"}
        chat = r["workloads"]["chat"]
        assert 0 < chat["ttft_s"] <= chat["e2e_s"] and chat["tpot_s"] > 0
        assert chat["output_tokens"] == 12
        assert r["perplexity"] > 1 and r["peak_rss_bytes"] > 0
        assert "greedy_tokens" not in r
    # Storage sizes: bf16 halves the weights and the KV cache of fp32.
    assert rows["bf16"]["weight_bytes"] == pytest.approx(rows["fp32"]["weight_bytes"] / 2,
                                                         rel=0.01)
    assert rows["bf16"]["kv_bytes_per_token"] == rows["fp32"]["kv_bytes_per_token"] / 2
    from turbollm.worker.model_loader import read_arch
    from turbollm.loader.resolve import resolve_model
    from turbollm.sizing import kv_cache_bytes_per_token
    arch = read_arch(resolve_model(str(tiny_llama)))[0]
    assert rows["fp32"]["kv_bytes_per_token"] == kv_cache_bytes_per_token(arch, "float32")
    # Quality: the baseline agrees with itself; the same weights in transformers score alike.
    assert rows["fp32"]["greedy_agreement"] == 1.0 and rows["fp32"]["greedy_exact_match"] == 1.0
    assert 0 <= rows["bf16"]["greedy_agreement"] <= 1
    assert rows["hf-fp32"]["perplexity"] == pytest.approx(rows["fp32"]["perplexity"], rel=1e-3)
    assert rows["hf-fp32"]["greedy_agreement"] == 1.0
    # Refusals and failures are results, with their reason.
    assert rows["gptq"]["status"] == "not available"
    assert "quantization=gptq" in rows["gptq"]["reason"]
    assert rows["badgroup"]["status"] == "not available"
    assert "quantization_group_size" in rows["badgroup"]["reason"]
    assert rows["llamacpp"]["status"] == "not available"
    # The Markdown: one row per configuration, refusals spelled out, ratios to the peer.
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| config | status | prefill tok/s")
    n_cols = table[0].count("|")
    main_rows = table[1:1 + len(rows)]
    assert [ln.split("|")[1].strip() for ln in main_rows] == list(rows)
    assert all(ln.count("|") == n_cols for ln in main_rows)
    assert "| gptq | not available: not available yet in this engine: quantization=gptq" in md
    assert "prefill vs hf" in md and "x (hf-fp32)" in md
    for png in ("tok_s_memory.png", "latency_vs_batch.png"):
        _check_png(tmp_path / png)


def test_bench_isolated_process_has_own_peak_memory(tiny_llama, tmp_path):
    res, md = _bench(tiny_llama, tmp_path, "--configs", "fp32", "--peers", "none",
                     "--no-plots")
    (r,) = res["results"]
    assert r["status"] == "ok" and r["isolated"] is True
    assert r["peak_rss_bytes"] > r["weight_bytes"]
    assert res["meta"]["isolate"] is True and "one process per configuration" in md


def test_interrupted_bench_keeps_the_configurations_it_finished(tiny_llama, tmp_path,
                                                                monkeypatch):
    from turbollm.bench import offline
    real_run_job = offline.run_job

    def run_job(job, stage):
        if job["config"]["name"] == "bf16":
            raise KeyboardInterrupt  # the user (or an outer time limit) stops the run here
        return real_run_job(job, stage)
    monkeypatch.setattr(offline, "run_job", run_job)
    from turbollm.cli import main
    args = ["bench", "--model", str(tiny_llama), "--num-threads", "1", "--device", "cpu",
            "--out", str(tmp_path), "--no-progress", "--no-isolate", "--configs", "fp32,bf16",
            "--peers", "none", "--no-plots"]
    for s in TINY_SPEC:
        args += ["--set", s]
    assert main(args) == 130  # interrupted
    saved = json.loads((tmp_path / "results.partial.json").read_text())
    assert [r["name"] for r in saved["results"]] == ["fp32"]
    assert saved["results"][0]["status"] == "ok" and saved["meta"]["preset"] == "quick"
    assert not (tmp_path / "results.json").exists()


def test_bench_rejects_unknown_config_and_setting(tiny_llama, capsys):
    from turbollm.cli import main
    assert main(["bench", "--model", str(tiny_llama), "--configs", "nope"]) == 2
    assert "unknown configuration" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_llama), "--set", "bogus=1"]) == 2
    assert "unknown bench setting" in capsys.readouterr().err


def test_matrix_lists_every_engine_technique():
    """Each quantization method and KV dtype the config accepts has a configuration."""
    from turbollm.bench.configs import build_matrix
    from turbollm.config import KV_CACHE_DTYPES, QUANTIZATION_METHODS, SPECULATIVE_METHODS
    configs = build_matrix(30)
    kw = [c.kwargs for c in configs]
    assert {k.get("quantization") for k in kw} >= set(QUANTIZATION_METHODS) - {"none"}
    assert {k.get("kv_cache_dtype") for k in kw} >= set(KV_CACHE_DTYPES) - {"auto"}
    assert {k.get("speculative_method") for k in kw} >= set(SPECULATIVE_METHODS) - {"none"}
    assert configs[0].name == "fp32" and {"bf16", "fp16"} <= {c.name for c in configs}


def test_peer_dtypes_pick_the_transformers_rows(tiny_llama, capsys):
    from turbollm.cli import main
    assert main(["bench", "--model", str(tiny_llama), "--preset", "full", "--list-configs",
                 "--peers", "hf,llamacpp", "--peer-dtypes", "float32"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "hf-fp32" in rows and "hf-bf16" not in rows and "llamacpp" in rows
    assert main(["bench", "--model", str(tiny_llama), "--list-configs", "--peers", "hf",
                 "--peer-dtypes", "int3"]) == 2
    assert "unknown peer dtype" in capsys.readouterr().err


def test_lora_row_runs_every_request_with_an_adapter(tiny_llama, tmp_path):
    from turbollm import LLM
    from turbollm.bench.lora_rows import with_random_adapter
    llm = LLM(model=str(tiny_llama), dtype="float32", enable_lora=True, num_threads=1,
              kv_cache_memory="8MiB")
    view = with_random_adapter(llm, 8, tmp_path / "adapter")
    (out,) = view.generate([[1, 2, 3]], use_tqdm=False)
    assert out.lora_request is not None and out.lora_request.lora_name == "bench"
    assert view.engine is llm.engine  # everything else passes through
    res, md = _bench(tiny_llama, tmp_path / "bench", "--no-isolate", "--configs", "lora-r16")
    row = {r["name"]: r for r in res["results"]}["lora-r16"]
    assert row["status"] == "ok", row
    assert row["decode_tok_s"] > 0 and "| lora-r16 | ok" in md

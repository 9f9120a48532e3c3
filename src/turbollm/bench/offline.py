"""The offline matrix: each configuration measured in turn, in its own process by default.

A process per configuration gives each one an honest peak-memory figure (the RSS high-water
mark never goes down within a process) and isolates crashes; `isolate=False` runs them all in
this process (faster; peak memory is then shared and reported as such).

    python -m turbollm.bench.offline JOB.json RESULT.json   # one configuration (internal)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from turbollm.bench.configs import BenchConfig
from turbollm.bench.workloads import BenchSpec

NOT_AVAILABLE = "not available"


def engine_kwargs_for(job: dict) -> dict:
    """The configuration's kwargs over the run's common ones, with a KV cache sized for the
    largest step (the CPU default of 2 GiB, zero-filled, would dominate peak memory)."""
    spec = BenchSpec(**job["spec"])
    kw = {**job["common"], **job["config"]["kwargs"]}
    if kw.get("kv_cache_memory") is None and kw.get("num_gpu_blocks_override") is None:
        block = kw.get("block_size") or 16
        kw["num_gpu_blocks_override"] = -(-spec.kv_tokens() // block) + max(spec.batch_sizes) + 8
    kw["max_num_seqs"] = max(kw.get("max_num_seqs") or 1, *spec.batch_sizes, spec.agree_prompts)
    return kw


def run_job(job: dict, stage=lambda s: None) -> dict:
    """Measure one configuration; never raises: a refusal or failure becomes a status."""
    cfg = job["config"]
    spec = BenchSpec(**job["spec"])
    t0 = time.perf_counter()
    try:
        if cfg.get("peer"):
            res = _run_peer(job, spec, stage)
        else:
            res = _run_ours(job, spec, stage)
        res["status"] = "ok"
    except ImportError as e:
        res = {"status": NOT_AVAILABLE, "reason": f"not installed: {e.name or e}"}
    except ValueError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        res = {"status": NOT_AVAILABLE, "reason": msg if "not available" in msg
               else f"refused: {msg}"}
    except Exception as e:  # noqa: BLE001 - any failure is a result, not a crash of the matrix
        res = {"status": NOT_AVAILABLE, "reason": f"failed: {type(e).__name__}: {e}"[:300],
               "traceback": traceback.format_exc(limit=6)}
    res["name"] = cfg["name"]
    res["kwargs"] = cfg["kwargs"]
    res["peer"] = cfg.get("peer")
    res["seconds"] = time.perf_counter() - t0
    return res


def _tokenizer_and_vocab(model: str, tokenizer: str | None):
    from turbollm.worker.model_loader import load_tokenizer_for, read_arch
    from turbollm.loader.resolve import resolve_model
    source = resolve_model(model)
    return source, load_tokenizer_for(source, tokenizer), read_arch(source)[0]


def _run_ours(job: dict, spec: BenchSpec, stage) -> dict:
    from turbollm import LLM
    from turbollm.bench.measure import Prompts, measure_ours
    stage("load")
    t = time.perf_counter()
    llm = LLM(**engine_kwargs_for(job))
    init_s = time.perf_counter() - t  # load + quantization / calibration at load
    prompts = Prompts(llm.tokenizer, spec, llm.engine.arch.vocab_size)
    rank = job["config"].get("lora_rank")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if rank:
                from turbollm.bench.lora_rows import with_random_adapter
                llm = with_random_adapter(llm, rank, Path(tmp) / "adapter")
            res = measure_ours(llm, spec, prompts, stage)
        extra, steps = llm.engine.stats.extra, llm.engine.stats.steps
        if "tp_comm_seconds" in extra and steps:  # tensor/pipeline parallel runs
            # per engine step, the slowest rank's (the whole run: warm-up and every phase)
            res["tp_comm_ms_per_step"] = 1e3 * extra["tp_comm_seconds"] / steps
            res["pp_wait_ms_per_step"] = 1e3 * extra["pp_wait_seconds"] / steps
    finally:
        llm.shutdown()
    res["load_s"] = init_s
    return res


def _run_peer(job: dict, spec: BenchSpec, stage) -> dict:
    import torch

    from turbollm.bench import peers
    from turbollm.bench.measure import Prompts
    common = job["common"]
    threads = common.get("num_threads") or os.cpu_count() or 1
    source, tokenizer, arch = _tokenizer_and_vocab(common["model"], common.get("tokenizer"))
    prompts = Prompts(tokenizer, spec, arch.vocab_size)
    stage("load")
    t = time.perf_counter()
    if job["config"]["peer"] == "hf":
        torch.set_num_threads(threads)
        dtype = getattr(torch, job["config"]["kwargs"].get("dtype", "float32"))
        model = (peers.hf_model_from_gguf(source.path, dtype) if source.kind == "gguf"
                 else peers.hf_model_from_dir(source.path, dtype))
        load = time.perf_counter() - t
        res = peers.measure_hf(model, spec, prompts, stage)
    else:
        if source.kind != "gguf":
            raise ValueError("llama.cpp runs GGUF files only")
        llm = peers.load_llamacpp(source.path, threads, spec.max_context() + 8)
        load = time.perf_counter() - t
        res = peers.measure_llamacpp(llm, spec, prompts, stage)
    res["load_s"] = load
    return res


def run_isolated(job: dict, timeout: float | None = None, stage=lambda s: None) -> dict:
    """run_job in a fresh interpreter; its own peak RSS; a crash becomes a status. The worker
    reports its stages on stderr ('@stage NAME' lines), passed on to `stage`."""
    import threading
    cfg = job["config"]

    def failed(reason: str) -> dict:
        return {"name": cfg["name"], "kwargs": cfg["kwargs"], "peer": cfg.get("peer"),
                "status": NOT_AVAILABLE, "reason": f"failed: {reason}"[:300],
                "seconds": time.perf_counter() - t0}

    with tempfile.TemporaryDirectory(prefix="turbollm-bench-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "turbollm.bench.offline", job_path,
                                 out_path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        tail: list[str] = []

        def read() -> None:
            for line in proc.stderr:
                if line.startswith("@stage "):
                    stage(line[7:].strip())
                elif line.strip():
                    tail[:] = (tail + [line.strip()])[-3:]
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return failed(f"over the {timeout:.0f}s time limit")
        reader.join(5)
        if os.path.exists(out_path):
            with open(out_path) as f:
                return json.load(f)
        return failed(f"worker exited {proc.returncode}: {' | '.join(tail)}")


def run_matrix(configs: list[BenchConfig], spec: BenchSpec, common: dict, isolate: bool = True,
               baseline: str = "fp32", progress: bool = True,
               timeout: float | None = None, on_result=None) -> list[dict]:
    """Measure every configuration (baseline first), then greedy agreement with the baseline.
    `on_result(results so far)` is called after each configuration (to save partial output:
    a full run takes an hour, and an interrupted one should keep what it measured)."""
    from tqdm import tqdm
    order = sorted(configs, key=lambda c: c.name != baseline)
    results = []
    bar = tqdm(order, desc="bench", unit="config", disable=not progress)
    for cfg in bar:
        bar.set_postfix_str(cfg.name)
        job = {"config": cfg.as_dict(), "spec": spec.as_dict(), "common": common}
        def stage(s: str, name: str = cfg.name) -> None:
            bar.set_postfix_str(f"{name}: {s}")
        res = run_isolated(job, timeout, stage) if isolate else run_job(job, stage)
        results.append(res)
        if res["status"] != "ok":
            bar.write(f"{cfg.name}: {res['status']} ({res['reason']})")
        if on_result is not None:
            on_result(results)
    bar.close()
    add_agreement(results, baseline)
    return results


def add_agreement(results: list[dict], baseline: str) -> None:
    """greedy_agreement / greedy_exact_match against the baseline's continuations."""
    from turbollm.eval.agreement import greedy_agreement
    base = next((r for r in results if r["name"] == baseline and r["status"] == "ok"), None)
    for r in results:
        if r["status"] == "ok" and base is not None:
            g = greedy_agreement(base["greedy_tokens"], r["greedy_tokens"])
            r["greedy_agreement"] = g.token_agreement
            r["greedy_exact_match"] = g.exact_match
    for r in results:
        r.pop("greedy_tokens", None)


def _worker_main(argv: list[str]) -> int:
    job_path, out_path = argv
    with open(job_path) as f:
        job = json.load(f)
    res = run_job(job, lambda s: print(f"@stage {s}", file=sys.stderr, flush=True))
    res["isolated"] = True
    with open(out_path, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))

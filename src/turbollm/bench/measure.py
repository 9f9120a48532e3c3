"""Measurements of our engine (`LLM`) for one configuration: speed, memory and quality.

Every timed generation is greedy with ignore_eos, so each configuration produces the same number
of tokens; prompts are distinct slices of the built-in corpus, so the prefix cache only hits
where a workload shares a prefix on purpose.
"""
from __future__ import annotations

import random
import resource
import statistics
import time

import torch

from turbollm.bench.workloads import BenchSpec, Workload


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def tensor_bytes(*roots) -> int:
    """Bytes of every distinct tensor storage reachable from modules, tensors and containers:
    parameters, buffers, and tensors a quantization method keeps as plain attributes."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    def walk(obj, depth: int = 0) -> None:
        if depth > 4 or obj is None:
            return
        if isinstance(obj, torch.Tensor):
            add(obj)
        elif isinstance(obj, torch.nn.Module):
            for t in obj.parameters():
                add(t)
            for t in obj.buffers():
                add(t)
            for m in obj.modules():
                for k, v in vars(m).items():  # unregistered tensors, quant-method state
                    if not k.startswith("_") and not isinstance(v, torch.nn.Module):
                        walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)) \
                and not callable(obj):
            for v in vars(obj).values():
                walk(v, depth + 1)

    for r in roots:
        walk(r)
    return total


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes as the quantization package counts them (packed values and scales, a tied
    head once)."""
    from turbollm.quantization.weight_bytes import model_weight_bytes as by_part
    return by_part(model)["total"]


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _params(n: int):
    from turbollm.sampling_params import SamplingParams
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _run(llm, prompts, n: int):
    """Generate, fail loudly on an engine error; (outputs, wall seconds)."""
    t = time.perf_counter()
    outs = llm.generate(prompts, _params(n), use_tqdm=False)
    dt = time.perf_counter() - t
    for o in outs:
        if o.error:
            raise RuntimeError(f"engine error: {o.error}")
        if len(o.outputs[0].token_ids) != n:
            raise RuntimeError(f"asked for {n} tokens, got {len(o.outputs[0].token_ids)}")
    return outs, dt


def request_latency(out) -> dict:
    """TTFT, TPOT and end-to-end seconds of one finished request from the engine's clock."""
    m = out.metrics
    n = len(out.outputs[0].token_ids)
    tpot = (m.finished_time - m.first_token_time) / (n - 1) if n > 1 else None
    return {"ttft_s": m.first_token_time - m.arrival_time, "tpot_s": tpot,
            "e2e_s": m.finished_time - m.arrival_time}


def prefill_tok_s(llm, prompts: list[list[int]]) -> float:
    """Best-of tok/s of one-token generations; prompts[0] warms up."""
    best = float("inf")
    for p in prompts[1:]:
        _, dt = _run(llm, [p], 1)
        best = min(best, dt)
    return len(prompts[1]) / best


def decode_tok_s(llm, prompt: list[int], n: int) -> float:
    """Batch-1 decode tok/s: time of n+1 tokens minus time of 1 (the prefill)."""
    _run(llm, [prompt], 4)  # warm-up
    _, t1 = _run(llm, [prompt], 1)
    _, tn = _run(llm, [prompt], n + 1)
    return n / max(tn - t1, 1e-9)


def run_workload(llm, w: Workload, prompts: list[list[int]]) -> dict:
    """Sequential requests; medians of TTFT / TPOT / e2e (e2e is wall time around generate)."""
    rows = []
    for p in prompts:
        outs, dt = _run(llm, [p], w.output_tokens)
        lat = request_latency(outs[0])
        lat["e2e_s"] = dt  # what a non-streaming caller waits, tokenization included
        rows.append(lat)
    return _summary(rows, w.requests * w.output_tokens)


def _summary(rows: list[dict], tokens: int) -> dict:
    med = {k: statistics.median(r[k] for r in rows if r[k] is not None)
           for k in ("ttft_s", "tpot_s", "e2e_s") if any(r[k] is not None for r in rows)}
    return {**med, "requests": len(rows), "output_tokens": tokens}


def batch_point(llm, prompts: list[list[int]], n: int) -> dict:
    """All prompts submitted at once (continuous batching): aggregate tok/s and mean latencies."""
    outs, dt = _run(llm, prompts, n)
    lats = [request_latency(o) for o in outs]
    mean = {k: statistics.fmean(x[k] for x in lats if x[k] is not None)
            for k in ("ttft_s", "tpot_s", "e2e_s") if any(x[k] is not None for x in lats)}
    return {"batch": len(prompts), "tok_s": len(prompts) * n / dt, "wall_s": dt, **mean}


class Prompts:
    """Every prompt a configuration needs, cut once from the corpus (same for all configs)."""

    def __init__(self, tokenizer, spec: BenchSpec, vocab: int):
        from turbollm.corpus import corpus_prompts, corpus_token_ids
        self.has_text = tokenizer is not None
        if tokenizer is None:  # dummy weights without a tokenizer: random ids
            def cut(n, length, seed):
                return random_prompts(n, length, vocab, seed)
        else:
            def cut(n, length, seed):
                return corpus_prompts(tokenizer, n, length, seed)
        self.prefill = cut(spec.prefill_reps + 1, spec.prefill_tokens, 1)
        self.decode = cut(1, spec.decode_prompt_tokens, 2)[0]
        self.workloads = {}
        for i, w in enumerate(spec.workload_list()):
            ps = cut(w.requests + 1, w.prompt_tokens - w.shared_prefix, 10 + i)
            if w.shared_prefix:
                prefix = cut(1, w.shared_prefix, 30 + i)[0]
                ps = [prefix + p for p in ps]
            self.workloads[w.name] = ps[:w.requests]
        self.batch = cut(max(spec.batch_sizes), spec.batch_prompt_tokens, 3)
        self.agree = cut(spec.agree_prompts, spec.agree_prompt_tokens, 4)
        self.ppl = (corpus_token_ids(tokenizer, max_tokens=spec.ppl_tokens) if tokenizer
                    else random_prompts(1, spec.ppl_tokens, vocab, 5)[0])


def measure_ours(llm, spec: BenchSpec, prompts: Prompts, stage=lambda s: None) -> dict:
    """Every figure of one configuration; `stage(name)` reports progress."""
    from turbollm.eval.perplexity import perplexity
    from turbollm.sizing import kv_cache_bytes_per_token
    eng = llm.engine
    res: dict = {"load_s": eng.load_time_s, "storage_dtype": str(eng.dtype).replace("torch.", ""),
                 "weight_bytes": model_weight_bytes(eng.executor.worker.model),
                 "system": dict(eng.system)}
    kv_alloc = tensor_bytes(eng.executor.worker.kv_cache)
    slots = eng.num_kv_blocks * eng.config.cache.block_size
    res["kv_bytes_per_token"] = kv_alloc / slots if kv_alloc else \
        kv_cache_bytes_per_token(eng.arch, eng.dtype)
    stage("prefill")
    res["prefill_tok_s"] = prefill_tok_s(llm, prompts.prefill)
    stage("decode")
    res["decode_tok_s"] = decode_tok_s(llm, prompts.decode, spec.decode_tokens)
    res["workloads"] = {}
    for w in spec.workload_list():
        stage(w.name)
        res["workloads"][w.name] = run_workload(llm, w, prompts.workloads[w.name])
    res["batch"] = []
    for b in spec.batch_sizes:
        stage(f"batch {b}")
        res["batch"].append(batch_point(llm, prompts.batch[:b], spec.batch_output_tokens))
    stage("perplexity")
    res["perplexity"] = perplexity(llm.score_logits, prompts.ppl, spec.ppl_max_length,
                                   spec.ppl_stride).perplexity
    stage("greedy")
    res["greedy_tokens"] = [list(o.outputs[0].token_ids)
                            for o in _run(llm, prompts.agree, spec.agree_tokens)[0]]
    res["peak_rss_bytes"] = peak_rss_bytes()
    if eng.spec is not None and eng.spec.num_draft_tokens:  # over every run above
        res["spec_acceptance_rate"] = eng.spec.num_accepted_tokens / eng.spec.num_draft_tokens
        res["spec_mean_accepted_length"] = 1 + (eng.spec.num_accepted_tokens
                                                / eng.spec.num_spec_steps)
    return res

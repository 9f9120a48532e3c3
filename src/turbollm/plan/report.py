"""Plain-text tables and JSON for estimates and recommendations."""
from __future__ import annotations

import dataclasses
from typing import Any

from turbollm.plan.cost_model import Estimate, Slo
from turbollm.plan.recommend import Candidate


def fmt_bytes(n: float) -> str:
    """Decimal units, as GPU memory is published: 1 GB = 1e9 bytes."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_time(s: float) -> str:
    """Seconds in the unit that reads best (us, ms, s)."""
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_flops(x: float) -> str:
    """FLOP/s in T or G units."""
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def fmt_usd(x: float) -> str:
    """Dollars with enough digits for sub-cent amounts."""
    return f"${x:.4f}" if x >= 0.01 else f"${x:.6f}"


def _rows(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [title] + [f"  {k:<{width}}  {v}" for k, v in rows] + [""]


def format_estimate(est: Estimate) -> str:
    """The readable report of one estimate: inputs, assumptions, memory, latency, cost."""
    s, w, m, eff = est.setup, est.workload, est.memory, est.setup.efficiency
    a, tp = s.arch, s.n_gpus
    compute = s.precision.compute_dtype(s.gpu)
    lines = [f"turbollm plan: {s.model_name} on {tp} x {s.gpu.name}"
             + (f" (tensor parallel {tp})" if tp > 1 else ""), ""]
    lines += _rows("Inputs", [
        ("model", f"{a.num_parameters() / 1e9:.2f} B params, {a.num_hidden_layers} layers, "
                  f"hidden {a.hidden_size}, {a.num_attention_heads} heads / "
                  f"{a.num_key_value_heads} KV heads x {a.head_dim}, vocab {a.vocab_size}"),
        ("hardware", f"{s.gpu.memory_gb:.0f} GB, {s.gpu.bandwidth_gbps:.0f} GB/s, "
                     f"{fmt_flops(s.gpu.peak_flops(compute))} {compute}, "
                     f"link {s.gpu.interconnect_gbps:.0f} GB/s, ${s.gpu.price_per_hour:.2f}/h"),
        ("precision", f"{s.precision.label}; matmuls in {compute}"),
        ("workload", f"prompt {w.prompt_len}, completion {w.completion_len}, batch {w.batch}"),
    ])
    lines += _rows("Assumptions (override with --mfu/--mbu/--comm-eff/--overhead-ms/...)", [
        ("MFU", f"{eff.mfu:.2f} of peak FLOP/s when compute-bound"),
        ("MBU", f"{eff.mbu:.2f} of peak bandwidth when memory-bound"),
        ("all-reduce", f"{eff.comm_eff:.2f} of link bandwidth + "
                       f"{s.gpu.allreduce_latency_us:.0f} us per call, 2 per layer"
                       if tp > 1 else "none (1 GPU)"),
        ("overhead", f"{fmt_time(eff.overhead_s)} per forward pass"),
        ("memory", f"{s.gpu_mem_util:.2f} of device memory usable; activations sized for "
                   f"{s.max_batched_tokens} tokens/pass"),
    ])
    per = " per GPU" if tp > 1 else ""
    weights, kv = fmt_bytes(m.weights_total), f"{m.kv_per_token:,} B"
    if tp > 1:
        weights += f" total, {fmt_bytes(m.weights_per_gpu)}{per}"
        kv += f" total, {m.kv_per_token_per_gpu:,} B{per}"
    lines += _rows("Memory", [
        ("weights", weights),
        ("KV cache / token", kv),
        ("activation reserve", f"{fmt_bytes(m.activation_per_gpu)}{per}"),
        ("usable", f"{fmt_bytes(m.usable_per_gpu)}{per}; left for KV "
                   f"{fmt_bytes(max(m.kv_budget_per_gpu, 0))}"),
        ("KV for this batch", f"{fmt_bytes(m.kv_needed_per_gpu)}{per} at {m.context_len} tokens"),
        ("fits", ("yes" if m.fits else "NO") + ("" if m.fits_weights else
                                                 " (the weights alone do not fit)")),
        ("max batch", f"{m.max_batch} sequences of {m.context_len} tokens"),
    ])
    lines += _rows("Latency", [
        ("prefill", _phase_text(est.prefill)),
        ("decode step", _phase_text(est.decode) + " (mean over the completion)"),
        ("TTFT", fmt_time(est.ttft_s)),
        ("TPOT", f"{fmt_time(est.tpot_s)} ({1 / est.tpot_s:.1f} tok/s per sequence)"),
        ("end-to-end", fmt_time(est.e2e_s)),
        ("throughput", f"{est.output_tokens_per_s:,.1f} output tok/s, "
                       f"{est.total_tokens_per_s:,.1f} total tok/s, "
                       f"{est.requests_per_s:.2f} req/s"),
    ])
    c = est.cost
    if c.price_per_hour <= 0:
        lines += _rows("Cost", [("price", "none given (--price $/GPU-hour)")])
        return "\n".join(lines).rstrip() + "\n"
    cost_rows = [
        ("price", f"${c.price_per_hour:.2f}/h for {tp} GPU(s)"),
        ("per 1K prompt", fmt_usd(c.per_1k_prompt)),
        ("per 1K completion", fmt_usd(c.per_1k_completion)),
        ("per request", fmt_usd(c.per_request)),
    ]
    if c.api_per_request is not None:
        cost_rows.append(("API per request", f"{fmt_usd(c.api_per_request)} "
                                             f"(ours = {c.api_ratio:.2f} x API)"))
    lines += _rows("Cost (machine busy at this batch)", cost_rows)
    return "\n".join(lines).rstrip() + "\n"


def _phase_text(p) -> str:
    parts = [f"compute {fmt_time(p.compute_s)}", f"memory {fmt_time(p.memory_s)}"]
    if p.comm_s:
        parts.append(f"all-reduce {fmt_time(p.comm_s)}")
    if p.overhead_s:
        parts.append(f"overhead {fmt_time(p.overhead_s)}")
    return f"{fmt_time(p.total_s)}  [{p.bound}-bound: {', '.join(parts)}]"


def format_recommendations(cands: list[Candidate], slo: Slo, top: int = 5) -> str:
    """A ranked table of the cheapest configurations meeting `slo`."""
    targets = ", ".join(f"{k} <= {fmt_time(v)}" for k, v in
                        (("E2E", slo.e2e_s), ("TTFT", slo.ttft_s), ("TPOT", slo.tpot_s))
                        if v is not None) or "none"
    if not cands:
        return f"No catalog configuration meets the SLO ({targets}).\n"
    header = ("#", "GPU", "n", "weights", "batch", "TTFT", "TPOT", "E2E", "out tok/s",
              "$/1K in", "$/1K out", "$/request")
    rows = [header]
    for i, cand in enumerate(cands[:top], 1):
        e = cand.estimate
        s = e.setup
        w = "int4-g%d" % s.precision.group_size if s.precision.weights == "int4" \
            else s.precision.weights
        rows.append((str(i), s.gpu.name, str(s.n_gpus), w, str(e.workload.batch),
                     fmt_time(e.ttft_s), fmt_time(e.tpot_s), fmt_time(e.e2e_s),
                     f"{e.output_tokens_per_s:,.0f}", fmt_usd(e.cost.per_1k_prompt),
                     fmt_usd(e.cost.per_1k_completion), fmt_usd(e.cost.per_request)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    table = ["  ".join(cell.rjust(wd) if j not in (1, 3) else cell.ljust(wd)
                       for j, (cell, wd) in enumerate(zip(r, widths))) for r in rows]
    best = cands[0].estimate
    w = best.workload
    intro = [f"Cheapest configurations meeting the SLO ({targets}) for prompt "
             f"{w.prompt_len} + completion {w.completion_len} tokens, "
             f"{len(cands)} of them found; top {min(top, len(cands))}:", ""]
    eff = best.setup.efficiency
    outro = ["", f"Recommended: {best.setup.n_gpus} x {best.setup.gpu.name}, "
                 f"{best.setup.precision.label}, batch {w.batch} "
                 f"({fmt_usd(best.cost.per_request)} per request). "
                 f"Assumes MFU {eff.mfu:.2f}, MBU {eff.mbu:.2f}, catalog prices."]
    return "\n".join(intro + table + outro) + "\n"


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def estimate_to_dict(est: Estimate) -> dict[str, Any]:
    """A JSON-ready dict of an estimate, its inputs included."""
    d = _plain(est)
    s = est.setup
    d["setup"]["num_parameters"] = s.arch.num_parameters()
    d["setup"]["compute_dtype"] = s.precision.compute_dtype(s.gpu)
    for phase in ("prefill", "decode"):
        d[phase]["bound"] = getattr(est, phase).bound
    return d


def recommendations_to_dict(cands: list[Candidate], slo: Slo, top: int = 5) -> dict[str, Any]:
    """A JSON-ready dict of the ranked recommendations."""
    return {"slo": _plain(slo), "num_found": len(cands),
            "candidates": [estimate_to_dict(c.estimate) for c in cands[:top]]}

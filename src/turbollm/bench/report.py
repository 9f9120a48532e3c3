"""The offline bench's output: Markdown tables (with ours/peer ratios), JSON, PNG charts."""
from __future__ import annotations

from pathlib import Path

MiB = 2**20


def _f(value, fmt: str = ".1f", scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, fmt)


def _batch_max(r: dict) -> dict | None:
    return max(r.get("batch") or [], key=lambda b: b["batch"], default=None)


def _matching_peer(r: dict, peers: list[dict], kind: str) -> dict | None:
    """The peer of `kind` at this configuration's storage dtype, else its first measured one."""
    ok = [p for p in peers if p["peer"] == kind and p["status"] == "ok"]
    same = [p for p in ok if p.get("storage_dtype") == r.get("storage_dtype")]
    return (same or ok or [None])[0]


def markdown(results: list[dict], meta: dict) -> str:
    """The main table, the per-workload latency table, the batch sweep and the peer ratios."""
    first_w = meta["workloads"][0] if meta.get("workloads") else None
    bmax = max(meta.get("batch_sizes") or [1])
    machine = meta.get("machine") or {}
    lines = [f"model {meta['model']}, {meta['threads']} threads, preset {meta['preset']}, "
             f"{'one process per configuration' if meta['isolate'] else 'one process (peak RSS shared)'}",
             "",
             f"machine: {machine.get('cpu', '?')}; flags {machine.get('flags', '?')}; "
             f"our C kernels: {machine.get('isa', '?')}",
             *[f"llama.cpp build: {r['system']['llama.cpp']}" for r in results
               if r.get("status") == "ok" and "llama.cpp" in r.get("system", {})][:1],
             "",
             f"| config | status | prefill tok/s | decode tok/s | TTFT ms ({first_w}) | "
             f"TPOT ms ({first_w}) | e2e s ({first_w}) | batch {bmax} tok/s | weights MiB | "
             "KV B/token | peak RSS MiB | perplexity | greedy agree | exact match | "
             "spec accept |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r['reason'].replace('|', '/')} |"
                         + " |" * 13)
            continue
        w = r["workloads"].get(first_w, {}) if first_w else {}
        b = _batch_max(r)
        lines.append(
            f"| {r['name']} | ok | {_f(r['prefill_tok_s'], '.0f')} | {_f(r['decode_tok_s'])} | "
            f"{_f(w.get('ttft_s'), '.0f', 1e3)} | {_f(w.get('tpot_s'), '.1f', 1e3)} | "
            f"{_f(w.get('e2e_s'), '.2f')} | {_f(b and b['tok_s'])} | "
            f"{_f(r['weight_bytes'], '.1f', 1 / MiB)} | {_f(r.get('kv_bytes_per_token'), '.0f')}"
            f" | {_f(r['peak_rss_bytes'], '.0f', 1 / MiB)} | {_f(r['perplexity'], '.3f')} | "
            f"{_f(r.get('greedy_agreement'), '.3f')} | {_f(r.get('greedy_exact_match'), '.2f')} | "
            f"{_f(r.get('spec_acceptance_rate'), '.2f')} |")
    ok = [r for r in results if r["status"] == "ok"]
    if len(meta.get("workloads") or []) > 1 and ok:
        lines += ["", "Latency by workload (median of sequential requests; TTFT / TPOT in ms, "
                  "e2e in s):", "",
                  "| config | " + " | ".join(f"{w} TTFT | {w} TPOT | {w} e2e"
                                          for w in meta["workloads"]) + " |",
                  "|---|" + "---|---|---|" * len(meta["workloads"])]
        for r in ok:
            cells = []
            for w in meta["workloads"]:
                x = r["workloads"].get(w, {})
                cells += [_f(x.get("ttft_s"), ".0f", 1e3), _f(x.get("tpot_s"), ".1f", 1e3),
                          _f(x.get("e2e_s"), ".2f")]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    sizes = meta.get("batch_sizes") or []
    if ok and sizes:
        lines += ["", "Batch sweep (all requests submitted at once; aggregate output tok/s / "
                  "mean end-to-end s):", "",
                  "| config | " + " | ".join(f"batch {b}" for b in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for r in ok:
            by = {b["batch"]: b for b in r.get("batch") or []}
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{by[b]['tok_s']:.1f} / {by[b]['e2e_s']:.2f}" if b in by else "n/a"
                for b in sizes) + " |")
    lines += _ratio_lines(results, bmax)
    return "\n".join(lines) + "\n"


def _ratio_lines(results: list[dict], bmax: int) -> list[str]:
    ours = [r for r in results if r["status"] == "ok" and not r.get("peer")]
    peers = [r for r in results if r.get("peer")]
    kinds = list(dict.fromkeys(p["peer"] for p in peers))
    if not ours or not kinds:
        return []
    out = ["", "Ours / peer (throughput ratios, > 1 = ours faster; the HF peer at the same "
           "storage dtype when measured, else HF fp32):", ""]
    head, rule = "| config |", "|---|"
    for k in kinds:
        head += f" prefill vs {k} | decode vs {k} | batch {bmax} vs {k} |"
        rule += "---|---|---|"
    out += [head, rule]
    for r in ours:
        row = f"| {r['name']} |"
        for k in kinds:
            p = _matching_peer(r, peers, k)
            if p is None:
                reason = next((x["reason"] for x in peers if x["peer"] == k), "not measured")
                row += f" {reason.replace('|', '/')} | | |"
                continue
            bo, bp = _batch_max(r), _batch_max(p)
            batch = f"{bo['tok_s'] / bp['tok_s']:.2f}x" if bo and bp else "n/a"
            row += (f" {r['prefill_tok_s'] / p['prefill_tok_s']:.2f}x ({p['name']}) |"
                    f" {r['decode_tok_s'] / p['decode_tok_s']:.2f}x | {batch} |")
        out.append(row)
    return out


def plot(results: list[dict], meta: dict, out_dir: str | Path) -> list[Path]:
    """tok_s_memory.png (per configuration) and latency_vs_batch.png."""
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in results if r["status"] == "ok"]
    names = [r["name"] for r in ok]
    x = range(len(ok))
    title = f"{meta['model']}, {meta['threads']} threads, preset {meta['preset']}"

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(9, 1.3 * len(ok) + 4), 4.5))
    wd = 0.4
    ax1.bar([i - wd / 2 for i in x], [r["decode_tok_s"] for r in ok], wd, label="decode (batch 1)")
    bmax = max(meta.get("batch_sizes") or [1])
    ax1.bar([i + wd / 2 for i in x], [(_batch_max(r) or {}).get("tok_s", 0) for r in ok], wd,
            label=f"aggregate, batch {bmax}")
    ax1.set(ylabel="output tokens / s", title="generation speed")
    ax1b = ax1.twinx()
    ax1b.plot(list(x), [r["prefill_tok_s"] for r in ok], "kD", label="prefill (right axis)")
    ax1b.set_ylabel("prefill tokens / s")
    ax2.bar([i - wd / 2 for i in x], [r["weight_bytes"] / MiB for r in ok], wd, label="weights")
    ax2.bar([i + wd / 2 for i in x], [r["peak_rss_bytes"] / MiB for r in ok], wd,
            label="peak RSS" + ("" if meta["isolate"] else " (shared process)"))
    ax2.set(ylabel="MiB", title="memory")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.legend(loc="upper left", fontsize=8)
    ax1b.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    speed_png = out / "tok_s_memory.png"
    fig.savefig(speed_png, dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, r in enumerate(ok):
        pts = sorted(r.get("batch") or [], key=lambda b: b["batch"])
        if not pts:
            continue
        bs = [p["batch"] for p in pts]
        # 20 distinct colors, and a second marker / dash past them: no two lines look alike.
        style = dict(color=plt.cm.tab20(i % 20), marker="os^"[i // 20 % 3],
                     ls="-" if i < 20 else "--", label=r["name"])
        ax1.plot(bs, [p["e2e_s"] for p in pts], **style)
        ax2.plot(bs, [p["tok_s"] for p in pts], **style)
    ax1.set(xscale="log", xlabel="batch size", ylabel="mean end-to-end s",
            title="request latency vs batch")
    ax2.set(xscale="log", xlabel="batch size", ylabel="aggregate output tok/s",
            title="throughput vs batch")
    for ax in (ax1, ax2):
        sizes = meta.get("batch_sizes") or [1]
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    lat_png = out / "latency_vs_batch.png"
    fig.savefig(lat_png, dpi=110)
    plt.close(fig)
    return [speed_png, lat_png]

"""PNG charts: latency and cost against batch size for one setup and workload."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from turbollm.plan.cost_model import ApiPrice, Estimate, estimate
from turbollm.plan.setup import Setup, Workload


def batch_sweep(setup: Setup, workload: Workload, max_batch: int = 256,
                api: ApiPrice | None = None) -> list[Estimate]:
    """Estimates at batch 1, 2, 4, ... up to the largest batch that fits (at least batch 1)."""
    out, b = [], 1
    while b <= max_batch:
        est = estimate(setup, replace(workload, batch=b), api)
        if not est.memory.fits and out:
            break
        out.append(est)
        b *= 2
    return out


def plot_vs_batch(setup: Setup, workload: Workload, out_dir: str | Path,
                  api: ApiPrice | None = None) -> list[Path]:
    """Write latency_vs_batch.png and cost_vs_batch.png into `out_dir`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = batch_sweep(setup, workload, api=api)
    batches = [e.workload.batch for e in sweep]
    title = f"{setup.model_name} on {setup.n_gpus} x {setup.gpu.name}, " \
            f"{setup.precision.weights}; prompt {workload.prompt_len}, " \
            f"completion {workload.completion_len}; batches up to the largest that fits"

    def batch_axis(ax) -> None:
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(batches, [e.ttft_s for e in sweep], "o-", label="TTFT")
    ax1.plot(batches, [e.e2e_s for e in sweep], "s-", label="end-to-end")
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="seconds",
            title="request latency")
    ax2.plot(batches, [e.tpot_s * 1e3 for e in sweep], "o-", color="C2", label="TPOT (ms)")
    ax2.set(xscale="log", xlabel="batch size", ylabel="ms per output token",
             title="per-token latency and throughput")
    ax3 = ax2.twinx()
    ax3.plot(batches, [e.output_tokens_per_s for e in sweep], "s--", color="C3",
             label="output tok/s")
    ax3.set_ylabel("output tokens / s")
    for ax in (ax1, ax2):
        batch_axis(ax)
    ax1.legend()
    ax2.legend(loc="upper left")
    ax3.legend(loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    latency_png = out / "latency_vs_batch.png"
    fig.savefig(latency_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(batches, [e.cost.per_1k_prompt for e in sweep], "o-", label="$ / 1K prompt tokens")
    ax.plot(batches, [e.cost.per_1k_completion for e in sweep], "s-",
            label="$ / 1K completion tokens")
    if api is not None:
        ax.axhline(api.completion_per_m / 1000, color="grey", ls="--",
                   label="API $ / 1K completion")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="dollars",
           title=f"cost at ${setup.gpu.price_per_hour * setup.n_gpus:.2f}/h")
    batch_axis(ax)
    ax.legend()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    cost_png = out / "cost_vs_batch.png"
    fig.savefig(cost_png, dpi=110)
    plt.close(fig)
    return [latency_png, cost_png]

"""`turbollm plan`: argument parsing and the command itself.

The main CLI calls `add_plan_parser(subparsers)` and dispatches to `run_plan(args)`;
`python -m turbollm.plan.cli ...` runs the same command on its own.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Callable

from turbollm.plan import hardware as hw
from turbollm.plan.cost_model import ApiPrice, Slo, estimate
from turbollm.plan.models import PRESETS, load_model
from turbollm.plan.recommend import DEFAULT_BATCHES, DEFAULT_GPU_COUNTS, recommend
from turbollm.plan.setup import (FLOAT_DTYPES, KV_DTYPES, COMPUTE_DTYPES, Efficiency, Precision,
                                 Setup, Workload)

DESCRIPTION = """\
The inference math for a model, GPU and workload: memory (weights, KV cache per token,
what fits, largest batch), latency (prefill, time per output token, TTFT, end-to-end),
throughput and cost. Every result states its assumptions (MFU, MBU, prices); see docs/plan.md.

examples:
  turbollm plan --model Llama-2-70B --hardware H100-SXM --gpus 2 --batch 8
  turbollm plan --model Llama-3-8B --recommend --slo-e2e 5s --prompt-len 512 --completion-len 313
  turbollm plan --model path/to/config.json --hardware L4 --quant int4 --json
  turbollm plan --hardware local --model SmolLM2-135M --plot plan_out/
"""


def parse_seconds(text: str) -> float:
    """'5s', '500ms', '200us', '0.2' (seconds) -> seconds."""
    s = text.strip().lower()
    for suffix, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * scale
    return float(s)


def parse_api_price(text: str) -> ApiPrice:
    """'0.5,1.5' -> $0.50 per 1M prompt and $1.50 per 1M completion tokens."""
    parts = [float(p) for p in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError("expected PROMPT,COMPLETION dollars per 1M tokens")
    return ApiPrice(*parts)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and hardware")
    g.add_argument("--model", default="SmolLM2-135M",
                   help=f"preset ({', '.join(PRESETS)}) or a HF config.json / its directory "
                        "(default: %(default)s)")
    g.add_argument("--hardware", default="H100-SXM",
                   help="catalog GPU (see --list-gpus) or 'local' to measure this machine "
                        "(default: %(default)s)")
    g.add_argument("--gpus", type=int, default=1, help="GPUs, tensor parallel (default: 1)")
    g.add_argument("--price", type=float, help="$ per GPU-hour (default: catalog price)")
    g.add_argument("--interconnect", type=float, help="GB/s per direction between GPUs")
    g.add_argument("--catalog", help="JSON file of GPU entries merged over the built-in catalog")
    g.add_argument("--list-models", action="store_true", help="list model presets and exit")
    g.add_argument("--list-gpus", action="store_true", help="list the GPU catalog and exit")

    g = p.add_argument_group("precision")
    g.add_argument("--dtype", choices=FLOAT_DTYPES,
                   help="activation dtype (default: bf16; 'local' picks the fastest measured)")
    g.add_argument("--quant", choices=("none", "fp8", "int8", "int4"),
                   help="weight quantization (default: none; --recommend tries all)")
    g.add_argument("--group-size", type=int, default=128, help="int4 group size (default: 128)")
    g.add_argument("--kv-dtype", choices=KV_DTYPES, help="KV-cache dtype (default: --dtype)")
    g.add_argument("--compute", choices=COMPUTE_DTYPES, default="auto",
                   help="matmul dtype; auto: fp8 for fp8 weights where supported, "
                        "else the activation dtype (int8/int4 weight-only)")

    g = p.add_argument_group("workload")
    g.add_argument("--prompt-len", type=int, default=512, help="default: %(default)s")
    g.add_argument("--completion-len", type=int, default=256, help="default: %(default)s")
    g.add_argument("--batch", "--concurrency", dest="batch", type=int, default=1,
                   help="sequences served together (default: 1)")
    g.add_argument("--context", type=int,
                   help="context length for 'max batch' (default: prompt + completion)")

    g = p.add_argument_group("efficiency (defaults are shown in the output)")
    g.add_argument("--mfu", type=float, help="FLOP/s utilization when compute-bound "
                                             "(default: 0.5 catalog, 0.7 local)")
    g.add_argument("--mbu", type=float, help="bandwidth utilization when memory-bound "
                                             "(default: 0.75 catalog, 0.8 local)")
    g.add_argument("--comm-eff", type=float, default=0.7,
                   help="all-reduce share of link bandwidth (default: %(default)s)")
    g.add_argument("--overhead-ms", type=float, default=0.0,
                   help="fixed cost per forward pass, ms (default: 0)")
    g.add_argument("--gpu-mem-util", type=float, default=0.9,
                   help="share of device memory the engine uses (default: %(default)s)")
    g.add_argument("--max-batched-tokens", type=int, default=8192,
                   help="tokens per forward pass (prefill chunk) (default: %(default)s)")
    g.add_argument("--max-num-seqs", type=int, default=256,
                   help="sequences per step, sizes the logits buffer (default: %(default)s)")

    g = p.add_argument_group("cost and recommendation")
    g.add_argument("--api-price", type=parse_api_price, metavar="IN,OUT",
                   help="compare with an API charging IN and OUT $ per 1M tokens")
    g.add_argument("--recommend", action="store_true",
                   help="search the catalog for the cheapest setup meeting the SLOs")
    g.add_argument("--slo-e2e", type=parse_seconds, metavar="T", help="end-to-end, e.g. 5s")
    g.add_argument("--slo-ttft", type=parse_seconds, metavar="T", help="time to first token")
    g.add_argument("--slo-tpot", type=parse_seconds, metavar="T", help="time per output token")
    g.add_argument("--gpu-types", help="comma list of catalog GPUs to search (default: all)")
    g.add_argument("--gpu-counts", type=_int_list, default=list(DEFAULT_GPU_COUNTS),
                   help="GPU counts to search (default: 1,2,4,8)")
    g.add_argument("--batches", type=_int_list, default=list(DEFAULT_BATCHES),
                   help="batch sizes to search (default: 1,2,4,...,256)")
    g.add_argument("--top", type=int, default=5, help="configurations to list (default: 5)")

    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print JSON instead of the table")
    g.add_argument("--plot", metavar="DIR", help="write latency/cost vs batch PNGs into DIR")


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `plan` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="memory, latency, throughput and cost math",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_plan)
    return p


def _catalog(args) -> dict[str, hw.GPUSpec]:
    return hw.load_catalog(args.catalog) if args.catalog else dict(hw.CATALOG)


def _resolve_gpu(args, catalog: dict[str, hw.GPUSpec]) -> hw.GPUSpec:
    if args.hardware.lower() == "local":
        from turbollm.plan.local_hw import measure_local  # imports torch; only when asked

        gpu = measure_local()
    else:
        gpu = hw.get_gpu(args.hardware, catalog)
    changes = {}
    if args.price is not None:
        changes["price_per_hour"] = args.price
    if args.interconnect is not None:
        changes["interconnect_gbps"] = args.interconnect
    return replace(gpu, **changes)


def _efficiency_for(args) -> Callable[..., Efficiency]:
    def make(gpu: hw.GPUSpec, weights: str | None = None) -> Efficiency:
        default_mbu = gpu.mbu_for(weights) if weights else gpu.default_mbu
        return Efficiency(mfu=args.mfu if args.mfu is not None else gpu.default_mfu,
                          mbu=args.mbu if args.mbu is not None else default_mbu,
                          comm_eff=args.comm_eff, overhead_s=args.overhead_ms / 1e3)
    return make


def _precision(args, dtype: str, quant: str | None) -> Precision:
    weights = dtype if quant in (None, "none") else quant
    return Precision(weights=weights, dtype=dtype, kv_dtype=args.kv_dtype or dtype,
                     group_size=args.group_size, compute=args.compute)


def _setup_kwargs(args) -> dict:
    return {"gpu_mem_util": args.gpu_mem_util, "max_batched_tokens": args.max_batched_tokens,
            "max_num_seqs": args.max_num_seqs}


def _list(args, catalog) -> str:
    if args.list_models:
        rows = []
        for name in PRESETS:
            _, a = load_model(name)
            rows.append(f"  {name:<14} {a.num_parameters() / 1e9:7.2f} B params, "
                        f"{a.num_hidden_layers} layers, {a.num_key_value_heads} KV heads")
        return "Model presets:\n" + "\n".join(rows) + "\n"
    rows = [f"  {'name':<11} {'mem GB':>6} {'GB/s':>6} {'bf16 TF':>8} {'fp8 TF':>7} "
            f"{'int8 TO':>8} {'link GB/s':>9} {'$/h':>6}  notes"]
    for g in catalog.values():
        fp8 = g.tflops.get("fp8")
        rows.append(f"  {g.name:<11} {g.memory_gb:6.0f} {g.bandwidth_gbps:6.0f} "
                    f"{g.tflops.get('bf16', 0):8.1f} {fp8 if fp8 else '-':>7} "
                    f"{g.tflops.get('int8', 0):8.1f} {g.interconnect_gbps:9.0f} "
                    f"{g.price_per_hour:6.2f}  {g.notes}")
    return "GPU catalog (dense peaks; prices indicative, override with --price/--catalog):\n" \
        + "\n".join(rows) + "\n"


def _run_recommend(args, name, arch, catalog, workload, api) -> int:
    from turbollm.plan.report import format_recommendations, recommendations_to_dict

    slo = Slo(args.slo_e2e, args.slo_ttft, args.slo_tpot)
    if slo.empty:
        print("--recommend needs at least one of --slo-e2e, --slo-ttft, --slo-tpot",
              file=sys.stderr)
        return 2
    gpus = [hw.get_gpu(n, catalog) for n in args.gpu_types.split(",")] if args.gpu_types \
        else list(catalog.values())
    if args.price is not None:
        gpus = [replace(g, price_per_hour=args.price) for g in gpus]
    dtype = args.dtype or "bf16"
    quants = [args.quant] if args.quant else ["none", "fp8", "int8", "int4"]
    precisions = [_precision(args, dtype, q) for q in quants]
    cands = recommend(arch, workload, slo, gpus, precisions, args.gpu_counts, args.batches,
                      _efficiency_for(args), api, model_name=name, **_setup_kwargs(args))
    if args.json:
        print(json.dumps(recommendations_to_dict(cands, slo, args.top), indent=2))
    else:
        print(format_recommendations(cands, slo, args.top), end="")
    if args.plot and cands:
        _plot(args, cands[0].estimate.setup, replace(workload, batch=1), api)
    return 0 if cands else 1


def _plot(args, setup, workload, api) -> None:
    from turbollm.plan.plots import plot_vs_batch

    paths = plot_vs_batch(setup, workload, args.plot, api)
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)


def run_plan(args: argparse.Namespace) -> int:
    """Run `turbollm plan` with parsed arguments; returns the exit status."""
    from turbollm.plan.report import estimate_to_dict, format_estimate

    try:
        catalog = _catalog(args)
        if args.list_models or args.list_gpus:
            print(_list(args, catalog), end="")
            return 0
        name, arch = load_model(args.model)
        workload = Workload(args.prompt_len, args.completion_len, args.batch)
        if args.recommend:
            return _run_recommend(args, name, arch, catalog, workload, args.api_price)
        gpu = _resolve_gpu(args, catalog)
        dtype = args.dtype or gpu.preferred_dtype
        precision = _precision(args, dtype, args.quant)
        setup = Setup(arch, gpu, args.gpus, precision,
                      _efficiency_for(args)(gpu, precision.weights), model_name=name,
                      **_setup_kwargs(args))
        est = estimate(setup, workload, args.api_price, args.context)
    except ValueError as e:
        print(f"turbollm plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(estimate_to_dict(est), indent=2))
    else:
        print(format_estimate(est), end="")
    if args.plot:
        _plot(args, setup, workload, args.api_price)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for `python -m turbollm.plan.cli`."""
    p = argparse.ArgumentParser(prog="turbollm plan", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m turbollm.plan.cli`."""
    return run_plan(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""`turbollm bench` (the offline matrix) and `turbollm bench serve` (an online load generator).

    turbollm bench --preset quick --out bench-results
    turbollm bench --preset full --peers hf,llamacpp --threads 2
    turbollm bench serve --base-url http://127.0.0.1:8000 --concurrency 8 --num-prompts 64
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_bench_parser(sub) -> argparse.ArgumentParser:
    from turbollm.bench.workloads import PRESETS, WORKLOADS
    from turbollm.cli_args import add_engine_args
    p = sub.add_parser("bench", help="benchmark a matrix of engine configurations (speed, memory, "
                                     "quality) against peers; 'bench serve' loads a server",
                       description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="workloads: " + ", ".join(
                           f"{w.name} ({w.prompt_tokens} in / {w.output_tokens} out"
                           f"{f', {w.shared_prefix} shared' if w.shared_prefix else ''})"
                           for w in WORKLOADS.values()))
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--configs", help="comma-separated configuration names to run (default: all;"
                                     " see --list-configs)")
    p.add_argument("--add-config", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                   help="an extra configuration, e.g. 'int4-g64:quantization=int4,"
                        "quantization_group_size=64'")
    p.add_argument("--list-configs", action="store_true", help="print the matrix and exit")
    p.add_argument("--peers", default="hf,llamacpp",
                   help="peer engines measured in the same run: hf, llamacpp, or none")
    p.add_argument("--peer-dtypes", default=None,
                   help="dtypes transformers runs at, comma-separated (default: float32 for "
                        "the quick preset, float32,bfloat16 for full)")
    p.add_argument("--baseline", default="fp32", help="configuration the greedy agreement of "
                                                      "every other one is measured against")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset size, e.g. decode_tokens=64, batch_sizes=1+4+16, "
                        "workloads=chatbot+rag")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="one process per configuration (honest peak memory)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per configuration before it counts as failed (isolated only)")
    p.add_argument("--out", default="bench-results",
                   help="folder for results.md, results.json and the PNG charts")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    add_engine_args(p)
    p.set_defaults(func=run_bench)
    modes = p.add_subparsers(dest="bench_mode", metavar="{serve,serve-vs-offline,overload,soak}")
    from turbollm.bench import overload, serve_vs_offline, soak
    from turbollm.bench.serve import add_serve_bench_parser
    add_serve_bench_parser(modes)
    serve_vs_offline.add_parser(modes)
    overload.add_parser(modes)
    soak.add_parser(modes)
    return p


def _common_engine_kwargs(args) -> dict:
    """Flags the user set explicitly-or-by-default, minus those a configuration decides."""
    from turbollm.cli_args import engine_kwargs
    kw = engine_kwargs(args)
    for key in ("dtype", "quantization", "kv_cache_dtype", "enable_prefix_caching",
                "speculative_method"):
        if kw.get(key) == _defaults().get(key):
            kw.pop(key, None)  # left to the configuration (or the engine default)
    return kw


def _defaults() -> dict:
    from dataclasses import fields

    from turbollm.cli_args import ENGINE_SECTIONS
    return {f.name: f.default for cls in ENGINE_SECTIONS for f in fields(cls)}


def run_bench(args) -> int:
    from turbollm.bench import report
    from turbollm.bench.configs import PEER_DTYPES, build_matrix, peer_configs
    from turbollm.bench.offline import run_matrix
    from turbollm.bench.workloads import PRESETS
    from turbollm.cli_args import parse_overrides
    from turbollm.config import default_num_threads
    from turbollm.worker.model_loader import read_arch
    from turbollm.loader.resolve import resolve_model

    spec = PRESETS[args.preset].with_overrides(parse_overrides(args.set))
    extra = {}
    for item in args.add_config:
        name, sep, rest = item.partition(":")
        if not sep or not name:
            raise ValueError(f"--add-config expects NAME:KEY=VALUE[,...], got {item!r}")
        extra[name] = parse_overrides(rest)
    arch = read_arch(resolve_model(args.model))[0]
    only = [c.strip() for c in args.configs.split(",")] if args.configs else None
    configs = build_matrix(arch.num_hidden_layers, only, extra)
    peers = [] if args.peers in ("", "none") else [p.strip() for p in args.peers.split(",")]
    peer_dtypes = ([d.strip() for d in args.peer_dtypes.split(",")] if args.peer_dtypes
                   else PEER_DTYPES.get(args.preset, ["float32"]))
    configs += peer_configs(peers, peer_dtypes)
    if args.list_configs:
        for c in configs:
            print(f"{c.name:18s} {c.peer or 'ours':8s} {c.kwargs}")
        return 0
    common = _common_engine_kwargs(args)
    threads = args.num_threads or default_num_threads()
    common["num_threads"] = threads
    meta = {"model": args.model, "preset": args.preset, "threads": threads,
            "isolate": args.isolate, "spec": spec.as_dict(),
            "workloads": [w.name for w in spec.workload_list()],
            "batch_sizes": spec.batch_sizes, "baseline": args.baseline,
            "machine": _machine()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "results.partial.json"  # every finished configuration, rewritten after each

    def save_partial(done: list[dict]) -> None:
        partial.write_text(json.dumps({"meta": meta, "results": done}, indent=2))
    results = run_matrix(configs, spec, common, isolate=args.isolate, baseline=args.baseline,
                         progress=not args.no_progress, timeout=args.timeout,
                         on_result=save_partial)
    table = report.markdown(results, meta)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    partial.unlink(missing_ok=True)
    charts = [] if args.no_plots else report.plot(results, meta, out)
    print(table)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}"
          + "".join(f", {c}" for c in charts), file=sys.stderr)
    return 0


def _machine() -> dict:
    import os
    import platform

    import torch

    from turbollm.worker.system_info import system_info
    info = system_info()
    return {"cpu": info["cpu"], "flags": info["flags"], "isa": info["isa"],
            "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

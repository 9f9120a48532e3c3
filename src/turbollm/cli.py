"""`turbollm` command line: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from turbollm.cli_errors import run_reporting_errors


def _add_generate(sub) -> None:
    from turbollm.cli_args import add_engine_args
    p = sub.add_parser("generate", help="generate a completion for a prompt and print tokens/s")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", dest="sample_seed", type=int, default=None,
                   help="seed for sampling (--seed seeds the engine)")
    p.add_argument("--ignore-eos", action="store_true")
    add_engine_args(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from turbollm import LLM, SamplingParams
    from turbollm.cli_args import engine_kwargs
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed,
                            ignore_eos=args.ignore_eos)
    llm = LLM(**engine_kwargs(args))
    prompts = args.prompt
    if args.chat:
        prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(o.num_generated_tokens for o in outs)
    for o in outs:
        print(o.outputs[0].text)
    print(f"[{n} tokens in {dt:.2f}s: {n / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def _add_info(sub) -> None:
    from turbollm.cli_args import add_dataclass_args
    from turbollm.config import KernelConfig
    p = sub.add_parser("info", help="what runs here: CPU, flags, kernel variant, dtype, threads")
    p.add_argument("--model", default="smollm2-135m", help="model whose dtype=auto to report")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int, default=None)
    add_dataclass_args(p, KernelConfig)
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from turbollm.config import DeviceConfig, KernelConfig, default_num_threads
    from turbollm.loader.resolve import resolve_model
    from turbollm.native_build import select_isa
    from turbollm.worker.model_loader import (compute_dtype_for, multi_row_products_in_bf16,
                                              read_arch, resolve_dtype)
    from turbollm.worker.system_info import system_info
    device = DeviceConfig(device=args.device).resolved_device()
    kc = KernelConfig(cpu_isa=args.cpu_isa, prefill_dtype=args.prefill_dtype)
    isa = select_isa(kc.cpu_isa) if device == "cpu" else None
    arch, _ = read_arch(resolve_model(args.model))
    storage = resolve_dtype(args.dtype, arch, device)
    compute = compute_dtype_for(storage, device, args.dtype)
    info = system_info(device, isa, args.num_threads or default_num_threads(), storage, compute)
    if device == "cpu":
        bf16 = multi_row_products_in_bf16(kc.prefill_dtype, isa, args.dtype, storage, compute)
        info["prefill_dtype"] = "bfloat16" if bf16 else "float32"
        from turbollm.layers import prefill_gemm
        from turbollm.quantization import kernels
        prefill_gemm.use_bf16(bf16)  # this process's switch, as a worker would set it
        info["lowbit_multi_row"] = kernels.multi_row_kernels()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _add_serve(sub) -> None:
    try:
        from turbollm.server.cli import add_serve_parser
    except ImportError:
        return
    add_serve_parser(sub)


def _add_plan(sub) -> None:
    try:
        from turbollm.plan.cli import add_plan_parser, run_plan
    except ImportError:
        return
    p = add_plan_parser(sub)
    if p is not None:
        p.set_defaults(func=run_plan)


def _add_bench_eval(sub) -> None:
    from turbollm.bench.cli import add_bench_parser
    from turbollm.eval.cli import add_eval_parser
    add_bench_parser(sub)
    add_eval_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbollm", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_info(sub)
    _add_plan(sub)
    _add_bench_eval(sub)
    from turbollm.compress.quantize import add_quantize_parser
    add_quantize_parser(sub)
    from turbollm.compress.lora_merge import add_lora_parser
    add_lora_parser(sub)
    from turbollm.compress.prune_cli import add_prune_parser
    add_prune_parser(sub)
    from turbollm.compress.distill import add_distill_parser
    add_distill_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: args.func(args), f"turbollm {args.command}")


if __name__ == "__main__":
    sys.exit(main())

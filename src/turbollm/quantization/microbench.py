"""Micro-benchmark of the quantized linear kernels against our bf16 path, on SmolLM2's shapes.

    python -m turbollm.quantization.microbench [--rows 1 64] [--threads 2] [--cpu-isa avx2]
        [--device cuda --shapes llama2-7b]

For each weight shape [out, in] and row count M, every variant runs in the same process, in
alternating rounds (the best round counts), so that ratios hold on a noisy machine:
bf16 = the engine's dense path (bf16 weights, fp32 activations: layers/linear.py), fp32 dense,
int8 per channel, int4 RTN group 32 (= the Q4_1 layout), fp8 per channel, through the
engine's own dispatch. On CUDA, bf16 is torch's bf16 matmul, fp32 the fp32 one, and the low-bit
variants take gpu_kernels (Triton) and fp8's torch._scaled_mm where the device has fp8 tensor
cores; every timed call is synchronized. --cpu-isa picks the C kernels' x86 build (as the
engine's --cpu-isa does), e.g. avx2 against the default avx512/amx one, in two runs.
"""
from __future__ import annotations

import argparse
import time
import types

import torch

import turbollm.native_build as native_build
from turbollm.layers.linear import UnquantizedLinearMethod
from turbollm.quantization import fp8, kernels
from turbollm.quantization.int4 import quantize_int4_rtn
from turbollm.quantization.int8 import quantize_int8

SHAPES = {  # [out, in]: each model's distinct linears (fused qkv and gate_up as the engine has them)
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
    "llama2-7b": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)],
}


def best_times_us(fns, iters: int, rounds: int = 7, sync=lambda: None) -> list[float]:
    """Best per-call time of each function over alternating rounds, in microseconds."""
    best = [float("inf")] * len(fns)
    for f in fns:
        f()
    for _ in range(rounds):
        for i, f in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                f()
            sync()
            best[i] = min(best[i], (time.perf_counter() - t0) / iters * 1e6)
    return best


def run(rows: list[int], shapes=SHAPES["smollm2"], device: str = "cpu",
        max_iters: int | None = None) -> list[dict]:
    torch.manual_seed(0)
    dense = UnquantizedLinearMethod()
    on_gpu = device != "cpu"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    results = []
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        bf16 = types.SimpleNamespace(weight=w.bfloat16().to(device), bias=None)
        fp32 = types.SimpleNamespace(weight=w.to(device), bias=None)
        s8 = kernels.state_to(kernels.int8_pack(*quantize_int8(w)), device)
        s4 = kernels.state_to(kernels.int4_pack(*quantize_int4_rtn(w, 32), 32), device)
        f8 = kernels.state_to(fp8.Fp8State(*fp8.quantize_fp8(w)), device)
        for m in rows:
            x = torch.randn(m, k, device=device)
            xa = x.bfloat16() if on_gpu else x  # the activations each engine path computes in
            iters = max(2, int((2e9 if on_gpu else 2e7) / (n * k * max(m, 8) ** 0.5)))
            iters = min(iters, max_iters or iters)
            t = best_times_us([lambda: dense.apply(bf16, xa), lambda: dense.apply(fp32, x),
                               lambda: kernels.int8_linear(xa, s8),
                               lambda: kernels.int4_linear(xa, s4),
                               lambda: fp8.fp8_linear(xa, f8)], iters, sync=sync)
            results.append({"shape": f"{n}x{k}", "rows": m, "bf16_us": t[0],
                             "fp32": t[0] / t[1], "int8": t[0] / t[2], "int4": t[0] / t[3],
                             "fp8": t[0] / t[4]})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--tile-config", help="Triton tiles from scripts/gpu_tune.py --tiles")
    ap.add_argument("--cpu-isa", choices=native_build.ISA_CHOICES, default="auto",
                    help="x86 build of the C kernels (fixed before any of them loads)")
    args = ap.parse_args(argv)
    # "auto" keeps whatever this process already runs (a test's process may have loaded one)
    isa = (native_build.select_isa(args.cpu_isa) if args.cpu_isa != "auto"
           else native_build.selected_isa())
    if args.tile_config:
        from turbollm.quantization import gpu_kernels
        gpu_kernels.load_tile_config(args.tile_config)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, C kernels {isa or 'none'}; speed-up over our bf16 "
          f"path (higher is faster)")
    print(f"{'shape [out x in]':>16} {'M':>3} {'bf16 us':>9} {'fp32':>6} {'int8':>6} {'int4':>6} "
          f"{'fp8':>6}")
    for r in run(args.rows, SHAPES[args.shapes], args.device):
        print(f"{r['shape']:>16} {r['rows']:>3} {r['bf16_us']:>9.1f} {r['fp32']:>5.2f}x "
              f"{r['int8']:>5.2f}x {r['int4']:>5.2f}x {r['fp8']:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

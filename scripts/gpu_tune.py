"""Sweep the Triton kernels' tile configurations on Llama-2-7B's linear shapes (needs a GPU).

    python scripts/gpu_tune.py [--json FILE] [--quick]

Writes the chosen configurations with --tiles; `--tile-config` that file (KernelConfig.tile_config) makes the engine
use them (quantization/gpu_kernels.py).

Kernel time only: each variant's calls are captured in a CUDA graph (20 calls cycling over
enough weight copies to overflow L2, so HBM is read as in a real decode step) and the graph's
replays are timed with CUDA events; the median of 10 replays counts. For every kernel and row
count the configuration with the least total time over the five shapes wins; the table compares
it with cuBLAS bf16 (F.linear) and with torch._scaled_mm (fp8, with the per-row rounding of x).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch
import torch.nn.functional as F

from turbollm.quantization import fp8, gpu_kernels as gk
from turbollm.quantization.kernels import Int4State, Int8State

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]
CALLS = 20


def graph_time_us(fn) -> float:
    """Median per-call microseconds of fn over graph replays (fn runs CALLS times per replay)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()  # warm-up on the capture stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(CALLS):
                fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def copies(make, nbytes: int) -> list:
    """Enough copies of a weight that cycling through them overflows a 50 MB L2."""
    return [make() for _ in range(max(2, -(-256 * 2**20 // nbytes)))]


def weights(n: int, k: int) -> dict[str, list]:
    dev = "cuda"
    return {
        "bf16": copies(lambda: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02,
                       n * k * 2),
        "int4": copies(lambda: Int4State(
            torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev),
            (torch.rand(n, k // 128, device=dev) * 0.01).half(),
            (torch.rand(n, k // 128, device=dev) * 15).half(), 128, True), n * k // 2),
        "int8": copies(lambda: Int8State(
            torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev),
            torch.rand(n, 1, device=dev) * 0.01, k), n * k),
        "fp8": copies(lambda: fp8.Fp8State(
            (torch.randn(n, k, device=dev) * 100).to(fp8.FP8),
            torch.rand(n, device=dev) * 1e-4), n * k),
    }


def cycling(fn, ws: list):
    it = itertools.cycle(ws)
    return lambda: fn(next(it))


def grid(name: str, quick: bool) -> list[dict]:
    if name.endswith("_rows"):
        axes = dict(BN=[4, 8, 16], BK=[256, 512], num_warps=[4], num_stages=[1, 3])
    else:
        axes = dict(BM=[16], BN=[32, 64, 128], BK=[64, 128], num_warps=[4], num_stages=[3])
    if quick:
        axes = {k: v[:1] for k, v in axes.items()}
    return [dict(zip(axes, vals)) for vals in itertools.product(*axes.values())]


KERNELS = {  # tile-config name -> (weight kind, call, row counts it serves)
    "int4_rows": ("int4", lambda x, s: gk.int4_linear(x, s), [1, 2, 4, 8]),
    "bytes_rows": ("int8", lambda x, s: gk.int8_linear(x, s), [1, 2, 4, 8]),
    "fp8_rows": ("fp8", lambda x, s: fp8.fp8_linear(x, s), [1, 2, 4, 8]),
    "int4_dot": ("int4", lambda x, s: gk.int4_linear(x, s), [2, 4, 8, 16, 64]),
    "int8_dot": ("int8", lambda x, s: gk.int8_linear(x, s), [2, 4, 8, 16, 64]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="every measurement")
    ap.add_argument("--tiles", help="the chosen configurations, a file for --tile-config")
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = sorted({m for *_, ms in KERNELS.values() for m in ms})
    base: dict = {}      # (shape, M) -> {"bf16": us, "scaled_mm": us}
    sweep: dict = {}     # (kernel, M) -> [(config, [us per shape])]
    for n, k in SHAPES:
        ws = weights(n, k)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            b = {"bf16": graph_time_us(cycling(lambda w: F.linear(x, w), ws["bf16"]))}
            if m >= 2:  # dequantize-then-cuBLAS, the other choice above a few rows
                b["widened_int4"] = graph_time_us(cycling(lambda s: gk.widened_int4(x, s),
                                                          ws["int4"]))
                b["widened_int8"] = graph_time_us(cycling(lambda s: gk.widened_int8(x, s),
                                                          ws["int8"]))
            if m >= 8:
                b["scaled_mm"] = graph_time_us(cycling(lambda s: fp8.fp8_scaled_linear(x, s),
                                                       ws["fp8"]))
            base[(n, k, m)] = b
        for name, (kind, call, ms) in KERNELS.items():
            tile = "bytes_rows" if name == "fp8_rows" else name
            saved = dict(gk.TILE_CONFIG[tile])
            # every row count to the kernel swept, whatever the dispatcher's threshold
            cut = 1 << 20 if name.endswith("_rows") else 0
            gk.ROW_KERNEL_MAX_ROWS = {"int4": cut, "bytes": cut}
            for cfg in grid(tile, args.quick):
                gk.TILE_CONFIG[tile] = cfg
                for m in ms:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    t = graph_time_us(cycling(lambda s: call(x, s), ws[kind]))
                    entry = sweep.setdefault((name, m), {})
                    entry.setdefault(json.dumps(cfg), []).append(t)
            gk.TILE_CONFIG[tile] = saved
        del ws
        torch.cuda.empty_cache()
        print(f"swept {n}x{k}", flush=True)
    out = {"best": {}, "base": {f"{n}x{k}x{m}": v for (n, k, m), v in base.items()}}
    print(f"{'kernel':>10} {'M':>3} {'best config':<62} " + " ".join(
        f"{n}x{k}".rjust(11) for n, k in SHAPES) + "  (us; x bf16)")
    for (name, m), by_cfg in sorted(sweep.items()):
        cfg, ts = min(by_cfg.items(), key=lambda kv: sum(kv[1]))
        ratios = [base[(n, k, m)]["bf16"] / t for (n, k), t in zip(SHAPES, ts)]
        out["best"][f"{name}/{m}"] = {"config": json.loads(cfg), "us": ts, "x_bf16": ratios}
        print(f"{name:>10} {m:>3} {cfg:<62} " + " ".join(
            f"{t:6.1f} {r:4.2f}x" for t, r in zip(ts, ratios)))
    print("bf16 us:", {f"{n}x{k}x{m}": round(v["bf16"], 1) for (n, k, m), v in base.items()})
    for kind in ("widened_int4", "widened_int8"):
        print(f"{kind} x bf16:", {f"{n}x{k}x{m}": round(v["bf16"] / v[kind], 2)
                                  for (n, k, m), v in base.items() if kind in v})
    print("scaled_mm x bf16:", {f"{n}x{k}x{m}": round(v["bf16"] / v["scaled_mm"], 2)
                                for (n, k, m), v in base.items() if "scaled_mm" in v})
    tiles = choose_tiles(sweep, base)
    print("chosen:", json.dumps(tiles))
    if args.tiles:
        with open(args.tiles, "w") as fh:
            json.dump(tiles, fh, indent=1)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


def choose_tiles(sweep: dict, base: dict) -> dict:
    """One configuration per kernel (least time summed over shapes and the row counts it would
    serve: rows kernels 1-4, tile kernels 8-64); per weight family the largest row count up to
    which its row kernel beats its tile kernel (int4: and dequantize-then-cuBLAS), and the
    smallest from which dequantize-then-cuBLAS beats the int4 tile kernel."""
    def total(name, cfg, ms):
        return sum(sum(sweep[(name, m)][cfg]) for m in ms)

    def widened(m):
        return sum(v["widened_int4"] for (n, k, mm), v in base.items() if mm == m)

    tiles: dict = {}
    for name, serves in (("int4_rows", [1, 2, 4]), ("bytes_rows", [1, 2, 4]),
                         ("int4_dot", [8, 16, 64]), ("int8_dot", [8, 16, 64])):
        cfgs = sweep[(name, serves[0])].keys()
        tiles[name] = json.loads(min(cfgs, key=lambda c: total(name, c, serves)))

    def row_cut(rows_name, dot_name, other=lambda m: float("inf")):
        cut = 1
        for m in (2, 4, 8):
            rows = total(rows_name, json.dumps(tiles[rows_name]), [m])
            if rows > min(total(dot_name, json.dumps(tiles[dot_name]), [m]), other(m)):
                break
            cut = m
        return cut

    tiles["row_kernel_max_rows"] = {"int4": row_cut("int4_rows", "int4_dot", widened),
                                    "bytes": row_cut("bytes_rows", "int8_dot")}
    cut = tiles["row_kernel_max_rows"]["int4"]
    dot = {m: total("int4_dot", json.dumps(tiles["int4_dot"]), [m]) for m in (2, 4, 8, 16, 64)}
    tiles["widen_from_rows"] = next((m for m in (2, 4, 8, 16, 64) if m > cut and
                                     widened(m) < dot[m]), gk.WIDEN_FROM_ROWS)
    return tiles


if __name__ == "__main__":
    raise SystemExit(main())

"""`--hardware local`: measure this machine's read bandwidth and matmul rate per dtype.

The numbers are what this machine actually reaches (not a datasheet). Bandwidth is a streaming
read; the default MBU is measured too, as the share of it that a decode-shaped product (one
activation row times a weight matrix, through the engine's own kernel) reaches, since that is
the op that streams the weights in decode — on a CPU once per weight format (fp32, bf16,
int8, int4), whose kernels differ: unpacking 4-bit weights costs more than reading them.
Results are cached per process: measuring takes a few seconds at most.
"""
from __future__ import annotations

import functools
import os
import time

import torch

from turbollm.plan.hardware import GPUSpec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure_read_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Bytes/s of a streaming read (sum over a tensor larger than the last-level cache)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()  # warm-up: page faults and first-touch happen here, not in the timing
    _sync(device)
    # best of a few: other processes only ever slow a run down
    return x.numel() * 4 / min(_timed(x.sum, device) for _ in range(reps))


CHUNK_ROWS = 1024  # weight matrices of 1024 x 1024, like a small model's projections


def _one_row_products(weights: str, nbytes: int, k: int = 1024):
    """(fn, bytes of weight it reads): one-row products over [CHUNK_ROWS, k] weights stored as
    `weights`, about `nbytes` in all, one after another through the kernel our engine's decode
    calls for that format -- as a decode step runs hundreds of products, each with its own
    call overhead and thread fork/join, not one huge one."""
    from turbollm.layers import native_ops
    from turbollm.quantization import kernels

    x, n = torch.ones(1, k), CHUNK_ROWS
    if weights == "int4":  # GGUF Q4_1 layout: 16 bytes + fp16 scale and min per 32 weights
        per = n * k * 20 // 32
        make = lambda: functools.partial(kernels.int4_linear, x, kernels.Int4State(  # noqa: E731
            torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
            torch.full((n, k // 32), 1e-3, dtype=torch.float16),
            torch.zeros(n, k // 32, dtype=torch.float16), 32, False))
    elif weights == "int8":  # per-channel scales
        per = n * k
        make = lambda: functools.partial(kernels.int8_linear, x, kernels.int8_pack(  # noqa: E731
            torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.full((n,), 1e-3)))
    else:
        dtype = _DTYPES[weights]
        per = n * k * (torch.finfo(dtype).bits // 8)

        def make():
            w = torch.ones(n, k).to(dtype)
            if native_ops.dense_linear_usable(x, w):
                return functools.partial(native_ops.dense_linear, x, w)
            return functools.partial(torch.nn.functional.linear, x.to(dtype), w)
    fns = [make() for _ in range(max(nbytes // per, 1))]

    def run():
        for f in fns:
            f()
    return run, per * len(fns)


def measure_gemv_bandwidth(device: torch.device, nbytes: int, reps: int = 5,
                           weights: str = "fp32") -> float:
    """Bytes/s of weight read by one-row products over `nbytes` of weights stored as `weights`
    (more than the last-level cache holds), through the kernels our engine's decode uses
    (fp32 and one large product on a GPU)."""
    if device.type != "cpu":
        w = torch.ones(max(nbytes // (4 * 1024), 1), 1024, device=device)
        x = torch.ones(1, 1024, device=device)
        gemv, read = functools.partial(torch.nn.functional.linear, x, w), w.numel() * 4
    else:
        gemv, read = _one_row_products(weights, nbytes)
    _timed(gemv, device)  # warm-up
    return read / min(_timed(gemv, device) for _ in range(reps))


def measure_matmul(device: torch.device, dtype: torch.dtype, max_n: int,
                   step_s: float = 0.05, budget_s: float = 0.25) -> float:
    """FLOP/s of square matmuls, growing n until one takes `step_s` (some CPUs emulate
    bf16/fp16 at <1 GFLOP/s, so a fixed large n could take a minute)."""
    n = 128
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        mm = functools.partial(torch.matmul, a, b)
        _timed(mm, device)  # warm-up (kernel selection, weight packing)
        dt = _timed(mm, device)
        if dt >= step_s or n >= max_n:
            break
        n *= 2
    best, deadline = dt, time.perf_counter() + budget_s
    for _ in range(50):
        if time.perf_counter() + best > deadline:
            break
        best = min(best, _timed(mm, device))
    return 2 * n**3 / best


def _total_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


@functools.lru_cache(maxsize=8)
def measure_local(device: str | None = None, bandwidth_bytes: int | None = None,
                  max_matmul_n: int | None = None) -> GPUSpec:
    """Measure this machine (CUDA device 0 if present, else the CPU) as a GPUSpec."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    # 256 MiB defeats CPU L3 caches (tens of MB); GPUs need more to hide launch latency.
    nbytes = bandwidth_bytes or ((2 << 30) if on_gpu else (256 << 20))
    max_n = max_matmul_n or (8192 if on_gpu else 2048)
    bw = measure_read_bandwidth(dev, nbytes)
    gemv_bw = measure_gemv_bandwidth(dev, nbytes)
    # on a CPU each weight format has its own kernel, some bound by unpacking, not memory
    formats = () if on_gpu else ("bf16", "int8", "int4")
    format_bw = {f: measure_gemv_bandwidth(dev, nbytes, weights=f) for f in formats}
    bw = max(bw, gemv_bw, *format_bw.values())  # no product reads faster than memory
    dtypes = ("fp32", "bf16", "fp16") if on_gpu else ("fp32", "bf16")
    tflops = {d: measure_matmul(dev, _DTYPES[d], max_n) / 1e12 for d in dtypes}
    if on_gpu:
        label = torch.cuda.get_device_name(dev)
    else:
        label = f"CPU x{torch.get_num_threads()} threads"
    # Plan in bf16, as the engine's dtype=auto runs: a CPU without bf16 math stores bf16 and
    # computes in fp32 (Precision.compute_dtype), a GPU computes in bf16.
    return GPUSpec(
        name=f"local ({label})",
        memory_gb=_total_memory_gb(dev),
        bandwidth_gbps=bw / 1e9,
        tflops=tflops,
        interconnect_gbps=0.0,  # one device: tensor parallelism is not planned locally
        price_per_hour=0.0,
        notes=f"measured: streaming read {bw / 1e9:.1f} GB/s, one-row product reads "
              + ", ".join(f"{f} {v / 1e9:.1f}" for f, v in
                          {"fp32": gemv_bw, **format_bw}.items())
              + " GB/s (= MBU per weight format); square matmuls",
        # the matmul rates are big square ones; a model's projections are smaller
        default_mfu=0.7,
        default_mbu=round(gemv_bw / bw, 2),
        mbu_by_weights=tuple((f, round(v / bw, 2)) for f, v in format_bw.items()),
        preferred_dtype="bf16",
    )

"""Batch decode of the bundled model with dense bf16 weights: our fp32 row kernel up to 128
rows (the rule before session 24) against the default, where batches of more than 8 rows (16
for small layers) take oneDNN's bf16 GEMM on CPUs with bf16 instructions:

    python scripts/dense_rows_speed.py [--rounds 3]

Two engines, each always run under its own rule (the native decoder binds its kernels per row
count on first use), alternating; greedy, 16-token prompts, 64 new tokens per request.
"""
from __future__ import annotations

import argparse
import time

from turbollm import LLM, SamplingParams
from turbollm.layers import native_ops

DEFAULT = (native_ops.MAX_DENSE_ROWS_BF16_GEMM, native_ops.MAX_DENSE_ROWS_BF16_GEMM_SMALL)
BEFORE = (native_ops.MAX_DENSE_ROWS, native_ops.MAX_DENSE_ROWS)
BATCHES = (1, 8, 16, 32, 64)


def rate(llm, batch: int, tokens: int = 64) -> float:
    prompts = [[1] + [100 + i + j for j in range(15)] for i in range(batch)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0,
                                                ignore_eos=True), use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    runs = [("before", LLM("smollm2-135m", quantization="none"), BEFORE),
            ("default", LLM("smollm2-135m", quantization="none"), DEFAULT)]
    res: dict = {}
    for r in range(args.rounds):
        for name, llm, limits in (runs if r % 2 == 0 else runs[::-1]):
            native_ops.MAX_DENSE_ROWS_BF16_GEMM, native_ops.MAX_DENSE_ROWS_BF16_GEMM_SMALL = limits
            for b in BATCHES:
                res.setdefault((name, b), []).append(rate(llm, b))
    print("| batch | before tok/s (best) | default tok/s (best) | default / before per round |")
    print("|---|---|---|---|")
    for b in BATCHES:
        old, new = res[("before", b)], res[("default", b)]
        print(f"| {b} | {max(old):.1f} | {max(new):.1f} | "
              + ", ".join(f"{n / o:.2f}x" for o, n in zip(old, new)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Micro-benchmark of the C paged attention (attention/csrc/paged_attn.c), optionally against
the same file at another git revision, in one process.

    python -m turbollm.bench.attention [--against REV] [--dtypes bf16,f32] [--threads 2]
        [--layers 30]

SmolLM2-135M's shapes (9 query heads, 3 KV heads, head_dim 64, 16-token blocks scattered over
the cache): one query row (a plain decode step) and 9 rows of one sequence (a step verifying
8 proposals) at several context lengths. One timed call attends over each of `layers` caches
in turn, as a decode step does, so K/V come from memory rather than from the L2 a single
cache would stay in (with one cache the two can rank differently). The libraries alternate
round by round and the best round counts, as this VM's speed drifts within minutes.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch

from turbollm.attention import native
from turbollm.native_build import load_library
from turbollm.quantization.microbench import best_times_us

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}
SOURCE = "src/turbollm/attention/csrc/paged_attn.c"


def library_at(rev: str):
    """paged_attn.c as it was at git revision rev, built and loaded (its own build key)."""
    root = Path(__file__).resolve().parents[3]
    text = subprocess.run(["git", "show", f"{rev}:{SOURCE}"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    src = Path(tempfile.mkdtemp()) / "paged_attn_at_rev.c"
    src.write_text(text)
    sigs = {k: v for k, v in native._SIGNATURES.items() if f" {k}(" in text}
    return load_library(src, sigs)


def attention_call(lib, caches, tables, rows: int, ctx: int):
    """fn() running the attention of `rows` query rows of one sequence over each (K, V) cache
    in turn, the last row seeing ctx tokens (a verification step's rows see ctx - rows + 1 ..
    ctx); returns the last output."""
    seq = torch.zeros(rows, dtype=torch.long)
    lens = torch.arange(ctx - rows + 1, ctx + 1)
    q, out = torch.randn(rows, HEADS, HEAD_DIM), torch.empty(rows, HEADS, HEAD_DIM)
    code = native.cache_parts(caches[0][0])[2]
    tail = (tables.data_ptr(), tables.shape[1], seq.data_ptr(), lens.data_ptr())

    def call():
        for kc, vc in caches:
            lib.paged_attn_rows(q.data_ptr(), q.stride(0), kc.data_ptr(), vc.data_ptr(), None,
                                None, code, *tail, out.data_ptr(), rows, HEADS, KV_HEADS,
                                HEAD_DIM, BLOCK, HEAD_DIM ** -0.5, 0)
        return out, (seq, lens, q)  # kept alive as long as the closure
    return call


def run(dtypes, against: str | None, contexts=(128, 650, 1500), row_counts=(1, 9),
        layers: int = 30) -> list[dict]:
    torch.manual_seed(0)
    libs = {"current": native.lib()}
    if against:
        libs[against] = library_at(against)
    num_blocks = max(contexts) // BLOCK + 64
    results = []
    for name in dtypes:
        caches = [tuple(torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM).to(DTYPES[name])
                        for _ in "kv") for _ in range(layers)]
        tables = torch.randperm(num_blocks)[:num_blocks - 8].unsqueeze(0).contiguous()
        for ctx in contexts:
            for rows in row_counts:
                times = best_times_us([attention_call(lib, caches, tables, rows, ctx)
                                       for lib in libs.values()], iters=3, rounds=15)
                results.append({"cache": name, "context": ctx, "rows": rows,
                                "us": dict(zip(libs, times))})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="git revision whose paged_attn.c to compare with")
    ap.add_argument("--dtypes", default="bf16,f32", help="KV cache dtypes: bf16, f32, f16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30, help="caches attended per timed call")
    args = ap.parse_args(argv)
    if native.lib() is None:
        print("no C attention on this machine (needs AVX2/FMA/F16C and gcc)")
        return 1
    torch.set_num_threads(args.threads)
    for r in run(args.dtypes.split(","), args.against, layers=args.layers):
        us = r["us"]
        line = f"{r['cache']:>4} cache, context {r['context']:>5}, {r['rows']} rows: " + \
            ", ".join(f"{k} {v:.1f} us" for k, v in us.items())
        if args.against:
            line += f"  (current / {args.against}: {us['current'] / us[args.against]:.2f})"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

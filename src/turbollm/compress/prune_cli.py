"""`turbollm prune` command line:

    turbollm prune MODEL --method magnitude|wanda|sparsegpt (--sparsity F | --pattern N:M)
                   [--calib N] [--calib-file F] --out DIR [--dtype D] [--save-format compressed|dense]
    turbollm prune MODEL --structured width=F|depth=N [--calib N] [--calib-file F] --out DIR
"""
from __future__ import annotations

import time

from turbollm.compress.prune_scores import METHODS


def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (unstructured, N:M or structured) and write "
                                     "an HF safetensors directory")
    p.add_argument("model", help="model directory, GGUF file, hub id or 'smollm2-135m'")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--sparsity", type=float, help="unstructured: fraction of each decoder "
                                                     "linear's weights to remove (e.g. 0.5)")
    kind.add_argument("--pattern", help="semi-structured N:M: keep N of every M inputs (2:4, 4:8)")
    kind.add_argument("--structured", help="width=F (remove KV groups and MLP channels) or "
                                           "depth=N (remove N layers): a smaller dense model")
    p.add_argument("--method", default="wanda", choices=METHODS,
                   help="weight scores for --sparsity / --pattern (default wanda)")
    p.add_argument("--calib", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--calib-file", default=None,
                   help="text file to calibrate on (default: the corpus shipped in the package)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="storage dtype (auto: the model's own, float32 for GGUF)")
    p.add_argument("--save-format", default="compressed", choices=["compressed", "dense"],
                   help="compressed: sparse weights in compressed-tensors sparse-bitmask / "
                        "sparse-24-bitmask; dense: zeros stored (for tools without a sparse "
                        "reader)")
    p.set_defaults(func=run_prune)


def run_prune(args) -> int:
    from turbollm.compress.calib import CalibConfig
    calib = CalibConfig(args.calib, args.calib_len, args.calib_file)
    t0 = time.perf_counter()
    if args.structured:
        from turbollm.compress.structured import StructuredConfig, structured_prune_model
        out, summary = structured_prune_model(args.model, StructuredConfig.parse(args.structured),
                                              args.out, calib, args.dtype)
    else:
        from turbollm.compress.prune import PruneConfig, prune_model
        from turbollm.compress.prune_scores import parse_pattern
        cfg = PruneConfig(args.method, args.sparsity,
                          None if args.pattern is None else parse_pattern(args.pattern))
        out, sparsity = prune_model(args.model, cfg, args.out, calib, args.dtype,
                                    args.save_format)
        summary = f"{cfg.method} {cfg.sparsity or cfg.structure}: {sparsity:.1%} of the " \
                  f"decoder linears' weights are zero"
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s ({summary})")
    return 0

"""Batch-1 decode of pruned models, bitmask-compressed vs the same weights dense:

    python scripts/sparse_speed.py [--threads 2] [--tokens 64] [--rounds 3] [--out /tmp/sparse]
        [--rows "unstructured 50%" "2:4" "width 25%" "2:4 int8"] [--cpu-isa auto|avx2|...]

Prunes the bundled SmolLM2-135M with magnitude scores (speed depends on how many weights are
zero, not on which: magnitude needs no calibration), 50% unstructured and 2:4, stored bf16 in
the compressed-tensors layout, and width 25% (a smaller dense model). Each sparse model is
served twice, `--sparsity auto` (the bitmask kernel at decode) and `--sparsity none` (dense
weights), alternating request by request; the width-pruned one against the 50% model's weights
served dense (the dense model's shapes, bf16). The "2:4 int8" row serves the 2:4 model with
`--quantization int8` both ways: the int8 2:4 kernel against the dense int8 kernels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from turbollm import LLM
from turbollm.bench.measure import decode_tok_s
from turbollm.cli import main as cli


def _pruned(out: Path, name: str, how: list[str]) -> Path:
    """The bundled model pruned by magnitude as `how` says, bf16, made once under `out`."""
    d = out / name.replace(" ", "_").replace(":", "of").replace("%", "")
    if not (d / "config.json").is_file():
        assert cli(["prune", "smollm2-135m", "--method", "magnitude", *how,
                    "--dtype", "bfloat16", "--out", str(d)]) == 0
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/sparse")
    ap.add_argument("--rows", nargs="+", default=None, help="which rows (default: all)")
    ap.add_argument("--cpu-isa", default="auto")
    args = ap.parse_args()
    out = Path(args.out)
    prompt = list(range(1000, 1032))
    results = {}
    # (row, the model's name and prune arguments, LLM arguments); the width row's baseline is
    # the 50% model's weights served dense, i.e. the dense model's shapes in bf16
    half, two_four = ("unstructured 50%", ["--sparsity", "0.5"]), ("2:4", ["--pattern", "2:4"])
    rows = (("unstructured 50%", half, {}), ("2:4", two_four, {}),
            ("width 25%", ("width 25%", ["--structured", "width=0.25"]), {}),
            ("2:4 int8", two_four, {"quantization": "int8"}))
    for name, (model, how), extra in rows:
        if args.rows and name not in args.rows:
            continue
        d = _pruned(out, model, how)
        base = d if name != "width 25%" else _pruned(out, *half)
        kw = dict(num_threads=args.threads, kv_cache_memory="64MiB", cpu_isa=args.cpu_isa,
                  **extra)
        pruned = LLM(str(d), **kw)
        dense = LLM(str(base), sparsity="none", **kw)
        rates = {"pruned": [], "dense": []}
        for r in range(args.rounds):
            order = (("pruned", pruned), ("dense", dense)) if r % 2 == 0 else \
                (("dense", dense), ("pruned", pruned))
            for key, llm in order:
                rates[key].append(decode_tok_s(llm, prompt, args.tokens))
        best = {k: max(v) for k, v in rates.items()}
        results[name] = {"pruned_tok_s": rates["pruned"], "dense_tok_s": rates["dense"],
                         "ratio_best": best["pruned"] / best["dense"]}
        print(name, json.dumps(results[name]), flush=True)
        del pruned, dense
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A distilled speculative draft against the same-size undistilled one, on the bundled model.

    python scripts/distill_draft.py [--layers 6] [--steps 150] [--threads 2] [--out DIR]

The teacher is the bundled SmolLM2-135M (Q4_1, served natively as the target). Both drafts keep
the same evenly spaced layers of it; one is distilled with `turbollm distill --for-draft` (total
variation on the teacher's own sampled continuations of corpus windows), the other is the plain
copy. Each then drafts for the target on open-ended chat prompts (never trained on), greedy,
K = 4, alternating with plain decoding request by request (bench/spec_decode.paired_rates):
acceptance rate and decode tok/s, and the held-out numbers of the distillation report.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from turbollm import LLM
from turbollm.bench.spec_decode import open_prompts, paired_rates
from turbollm.compress.distill import DistillConfig, distill
from turbollm.compress.trainable import drop_layers, evenly_spaced_layers, load_trainable, save_hf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="/tmp/distill_draft")
    args = ap.parse_args()
    out = Path(args.out)
    teacher, cfg, tok = load_trainable("smollm2-135m")
    plain_dir = save_hf(drop_layers(teacher, evenly_spaced_layers(
        teacher.config.num_hidden_layers, args.layers)), cfg, tok, out / "plain")
    del teacher
    t0 = time.perf_counter()
    report = distill(DistillConfig(teacher="smollm2-135m", out=str(out / "distilled"),
                                   student_layers=args.layers, for_draft=True,
                                   steps=args.steps, batch_size=args.batch_size,
                                   seq_len=args.seq_len, num_threads=args.threads))
    train_s = time.perf_counter() - t0
    base = dict(num_threads=args.threads)
    plain = LLM("smollm2-135m", **base)
    prompts = open_prompts(plain)
    res = {"distill_seconds": train_s, "held_out": {k: report[k] for k in ("before", "after")}}
    for name, d in (("undistilled", plain_dir), ("distilled", out / "distilled")):
        spec = LLM("smollm2-135m", speculative_method="draft", draft_model=str(d),
                   num_speculative_tokens=4, **base)
        ref, got = paired_rates(plain, spec, prompts, args.tokens)
        res[name] = {"acceptance_rate": got["acceptance_rate"], "tok_s": got["tok_s"],
                     "plain_tok_s": ref["tok_s"], "speedup": got["tok_s"] / ref["tok_s"]}
        print(name, json.dumps(res[name]))
        del spec
    plain_rate = res["undistilled"]["acceptance_rate"] or 0.0
    res["acceptance_gain"] = ((res["distilled"]["acceptance_rate"] or 0.0) / plain_rate
                              if plain_rate else None)  # None: the plain copy accepted nothing
    print(json.dumps(res, indent=2))
    (out / "result.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

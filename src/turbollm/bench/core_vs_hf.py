"""Engine-core benchmark: our engine vs Hugging Face transformers, same machine, same run.

    python -m turbollm.bench.core_vs_hf [--threads 2] [--json out.json]

(`turbollm bench` measures the same and more over every configuration; this script keeps the
engine-core issue's fixed workload and its table of targets.)

Measures on the bundled SmolLM2-135M: batch-1 decode (achieved GB/s vs measured read bandwidth),
512-token prefill, and 64 concurrent requests (128-token prompts, 16..256 output tokens,
ignore_eos) — ours with continuous batching, transformers with padded batched generate().
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from turbollm import LLM, SamplingParams
from turbollm.bench.measure import decode_tok_s, prefill_tok_s, random_prompts, tensor_bytes
from turbollm.bench.peers import hf_batch_point, hf_decode_tok_s, hf_prefill_tok_s
from turbollm.loader.resolve import bundled_model_path
from turbollm.plan.local_hw import measure_read_bandwidth

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# The measurements are the offline bench's own (bench/measure.py, bench/peers.py); this script
# keeps the engine-core issue's fixed workload and table.
def ours_decode(llm: LLM, new_tokens: int = 128) -> float:
    """Batch-1 decode tok/s after a 16-token prompt."""
    prompt = random_prompts(1, 16, llm.engine.arch.vocab_size, seed=1)[0]
    return decode_tok_s(llm, prompt, new_tokens)


def ours_prefill(llm: LLM, length: int = 512, reps: int = 3) -> float:
    """Seconds to prefill one `length`-token prompt (best of `reps`, distinct prompts)."""
    return length / prefill_tok_s(llm, random_prompts(reps + 1, length,
                                                      llm.engine.arch.vocab_size, seed=2))


def ours_batch(llm: LLM, prompts, lengths) -> float:
    """Aggregate output tok/s over all requests submitted at once (per-request lengths)."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    return sum(lengths) / dt


def hf_decode(model, new_tokens: int = 128) -> float:
    return hf_decode_tok_s(model, random_prompts(1, 16, model.config.vocab_size, seed=1)[0],
                           new_tokens)


def hf_prefill(model, length: int = 512, reps: int = 3) -> float:
    return length / hf_prefill_tok_s(model, random_prompts(reps + 1, length,
                                                           model.config.vocab_size, seed=2))


def hf_batch(model, prompts, lengths) -> float:
    """Useful output tok/s of one padded batched generate() to the longest requested length."""
    point = hf_batch_point(model, prompts, max(lengths))
    return sum(lengths) / point["wall_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="our dtypes to measure")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--skip-hf-batch", action="store_true", help="skip the slowest peer run")
    ap.add_argument("--quantization", default="none",
                    help="ours: none (dense weights, the issue's comparison) or a method, e.g. "
                         "gguf to serve the bundled file's Q4_1/Q8_0 weights natively")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from turbollm.bench.peers import hf_model_from_gguf
    gguf = bundled_model_path()
    read_bw = measure_read_bandwidth(torch.device("cpu"), 512 * 2**20)
    res: dict = {"threads": args.threads, "read_bandwidth_gbs": read_bw / 1e9}
    rng = random.Random(3)
    lengths = [rng.randint(16, 256) for _ in range(args.batch)]
    prompts = random_prompts(args.batch, 128, 49152, seed=4)

    for name in args.dtypes.split(","):
        llm = LLM("smollm2-135m", dtype=name, quantization=args.quantization,
                  num_threads=args.threads,
                  max_num_seqs=max(64, args.batch), max_num_batched_tokens=2048,
                  enable_prefix_caching=False)
        wb = tensor_bytes(llm.engine.executor.worker.model)
        dec = ours_decode(llm)
        res[f"ours_{name}"] = {
            "decode_tok_s": dec, "decode_gbs": dec * wb / 1e9, "weight_bytes": wb,
            "prefill_512_s": ours_prefill(llm),
            "batch_tok_s": ours_batch(llm, prompts, lengths)}
        print(name, res[f"ours_{name}"], flush=True)
        del llm

    for name in ("float32", "bfloat16"):
        model = hf_model_from_gguf(gguf, DTYPES[name])
        r = {"decode_tok_s": hf_decode(model), "prefill_512_s": hf_prefill(model)}
        if name == "float32" and not args.skip_hf_batch:
            r["batch_tok_s"] = hf_batch(model, prompts, lengths)
        res[f"hf_{name}"] = r
        print("hf", name, r, flush=True)
        del model
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def report(res: dict) -> str:
    """Markdown table of the targets of the engine-core issue, with ratios."""
    hf32, hf16 = res["hf_float32"], res["hf_bfloat16"]
    lines = [f"read bandwidth: {res['read_bandwidth_gbs']:.1f} GB/s, threads: {res['threads']}", "",
             "| config | decode tok/s | decode GB/s | vs HF fp32 decode | prefill 512 (s) | "
             "vs HF bf16 prefill | batch tok/s | vs our decode | vs HF batched |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in [k for k in res if k.startswith("ours_")]:
        r = res[key]
        hb = hf32.get("batch_tok_s")
        lines.append(
            f"| {key} | {r['decode_tok_s']:.1f} | {r['decode_gbs']:.1f} | "
            f"{r['decode_tok_s'] / hf32['decode_tok_s']:.2f}x | {r['prefill_512_s']:.3f} | "
            f"{hf16['prefill_512_s'] / r['prefill_512_s']:.2f}x | {r['batch_tok_s']:.0f} | "
            f"{r['batch_tok_s'] / r['decode_tok_s']:.1f}x | "
            f"{(r['batch_tok_s'] / hb) if hb else float('nan'):.2f}x |")
    for key in ("hf_float32", "hf_bfloat16"):
        r = res[key]
        lines.append(f"| {key} | {r['decode_tok_s']:.1f} | | | {r['prefill_512_s']:.3f} | | "
                     f"{r.get('batch_tok_s', float('nan')):.0f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

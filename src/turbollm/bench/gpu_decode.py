"""Decode speed and weight bytes of each weight format on a CUDA GPU, dummy weights of a preset.

    python -m turbollm.bench.gpu_decode [--model llama-2-7b] [--formats bf16,int8,int4,fp8]
        [--rounds 2] [--batch 32] [--json FILE]

Every format gets its own engine in one process (bf16 storage and activations, random weights
of the preset's shapes) and the formats alternate within each round, so their ratios see the
same GPU state. Per format: weight bytes; batch-1 decode tok/s (128 new tokens after a
128-token prompt, minus the time of the prompt's own step); and the aggregate tok/s of `batch`
requests decoded together. The best round counts. "weights read GB/s" is the bytes of the
linear layers and the head (what every decode step streams) times the batch-1 steps per second:
against the card's memory bandwidth it says how far decoding is from its floor.
"""
from __future__ import annotations

import argparse
import json

import torch

from turbollm import LLM
from turbollm.bench.measure import batch_point, decode_tok_s, random_prompts
from turbollm.quantization.weight_bytes import model_weight_bytes

FORMATS = {  # name -> LLM keyword arguments beyond the common ones
    "bf16": {"quantization": "none"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4", "quantization_group_size": 128},
    "fp8": {"quantization": "fp8"},
}


def build(model: str, fmt: str, kv_cache_memory: str, tile_config: str | None = None) -> LLM:
    return LLM(model, load_format="dummy", device="cuda", dtype="bfloat16",
               kv_cache_memory=kv_cache_memory, tile_config=tile_config, **FORMATS[fmt])


def measure(llms: dict[str, LLM], rounds: int, batch: int, prompt_len: int = 128,
            new_tokens: int = 128) -> dict[str, dict]:
    vocab = next(iter(llms.values())).engine.arch.vocab_size
    prompt = random_prompts(1, prompt_len, vocab, seed=1)[0]
    batch_prompts = random_prompts(batch, prompt_len, vocab, seed=2)
    best = {f: {"decode_tok_s": 0.0, f"batch{batch}_tok_s": 0.0} for f in llms}
    for r in range(rounds):
        for fmt, llm in llms.items():
            b = best[fmt]
            d = decode_tok_s(llm, prompt, new_tokens)
            point = batch_point(llm, batch_prompts, new_tokens)
            print(f"round {r} {fmt}: decode {d:.1f} tok/s, batch {batch} {point['tok_s']:.0f} "
                  "tok/s", flush=True)
            b["decode_tok_s"] = max(b["decode_tok_s"], d)
            b[f"batch{batch}_tok_s"] = max(b[f"batch{batch}_tok_s"], point["tok_s"])
    for fmt, llm in llms.items():
        best[fmt]["weight_bytes"] = model_weight_bytes(llm.engine.executor.worker.model)
    return best


def report(results: dict[str, dict], batch: int) -> str:
    base = results.get("bf16")
    lines = [f"| format | weight GB | decode tok/s | x bf16 | weights read GB/s | "
             f"batch {batch} tok/s | x bf16 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for fmt, r in results.items():
        d, t = r["decode_tok_s"], r[f"batch{batch}_tok_s"]
        rd = f"{d / base['decode_tok_s']:.2f}" if base else "-"
        rt = f"{t / base[f'batch{batch}_tok_s']:.2f}" if base else "-"
        wb = r["weight_bytes"]
        read = (wb["linear"] + wb["lm_head"]) * d / 1e9  # what one decode step must stream
        lines.append(f"| {fmt} | {wb['total'] / 1e9:.2f} | {d:.1f} | {rd} | {read:.0f} | "
                     f"{t:.0f} | {rt} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-2-7b", help="a preset name (dummy weights)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--kv-cache-memory", default="4GiB", help="KV cache of each format's engine")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tile-config", help="Triton tiles from scripts/gpu_tune.py --tiles")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        p.error(f"unknown format(s) {unknown}; choose from {list(FORMATS)}")
    llms = {}
    for f in formats:
        llms[f] = build(args.model, f, args.kv_cache_memory, args.tile_config)
        print(f"built {f}", flush=True)
    results = measure(llms, args.rounds, args.batch)
    out = {"model": args.model, "device": torch.cuda.get_device_name(0), "batch": args.batch,
           "results": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    print(f"{args.model} on {out['device']}")
    print(report(results, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LoRA speed on the bundled model (issue 26's targets), base and adapters alternating:

    python scripts/lora_speed.py [--rank 16] [--rounds 3] [--tokens 128]

- adapter load time (PEFT directory -> slots), r = --rank on all seven targets;
- batch-1 greedy decode tok/s, base vs one adapter;
- 64 concurrent requests spread over 8 adapters vs the same 64 on the base, output tok/s;
- with --mixed-ranks: batch-1 decode of rank 1, 16 and 64 adapters loaded together (slots sized
  for rank 64), each against the base: what a small adapter costs beside a large one;
- with --paired R [R ...]: batch-1 decode, one engine per rank, base and adapter in alternating
  pairs: the median of the pairs' time-per-token overheads (robust to a noisy machine).
Adapters are random (A, B ~ N(0, 0.02)), written as PEFT directories without peft.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from turbollm import LLM, LoRARequest, SamplingParams
from turbollm.bench.lora_rows import write_adapter

def decode_tok_s(llm: LLM, prompts, params, lora) -> float:
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def paired(ranks: list[int], rounds: int, tokens: int) -> None:
    """Per rank: batch-1 time-per-token overhead of one adapter, as the median over pairs."""
    one = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompt = ["Write a short story about a lighthouse keeper."]
    for rank in ranks:
        llm = LLM("smollm2-135m", enable_lora=True, max_loras=8, kv_cache_memory="512MiB")
        with tempfile.TemporaryDirectory() as tmp:
            write_adapter(Path(tmp) / "a", llm.engine.arch, rank, seed=0)
            adapter = LoRARequest("a", 1, str(Path(tmp) / "a"))
            llm.engine.add_lora(adapter)
            decode_tok_s(llm, prompt, one, adapter)  # warm both paths
            decode_tok_s(llm, prompt, one, None)
            overheads = []
            for r in range(rounds):
                if r % 2 == 0:
                    base = decode_tok_s(llm, prompt, one, None)
                    lora = decode_tok_s(llm, prompt, one, adapter)
                else:
                    lora = decode_tok_s(llm, prompt, one, adapter)
                    base = decode_tok_s(llm, prompt, one, None)
                overheads.append(base / lora - 1)
        print(f"rank {rank}: batch-1 time per token vs base, paired median over {rounds}: "
              f"{statistics.median(overheads) * 100:+.1f}% (pairs: "
              + " ".join(f"{o * 100:+.1f}" for o in overheads) + ")", flush=True)
        del llm


def mixed_ranks(rounds: int, tokens: int) -> None:
    """Batch-1 decode per adapter rank, all three adapters in slots of the largest rank."""
    llm = LLM("smollm2-135m", enable_lora=True, max_loras=8, kv_cache_memory="512MiB")
    one = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompt = ["Write a short story about a lighthouse keeper."]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {None: None}
        for i, rank in enumerate((1, 16, 64)):
            path = Path(tmp) / f"r{rank}"
            write_adapter(path, llm.engine.arch, rank, seed=i)
            adapters[rank] = LoRARequest(f"r{rank}", i + 1, str(path))
            llm.engine.add_lora(adapters[rank])
        rates = {rank: [] for rank in adapters}
        for r in range(rounds + 1):  # the first round warms every path up
            for rank, lora in adapters.items():
                rate = decode_tok_s(llm, prompt, one, lora)
                if r:
                    rates[rank].append(rate)
        base = max(rates[None])
        print(f"batch-1 decode tok/s (best of {rounds}), slots of rank 64: base {base:.1f}, "
              + ", ".join(f"rank {k} {max(v):.1f} ({(base / max(v) - 1) * 100:+.1f}%)"
                          for k, v in rates.items() if k is not None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--mixed-ranks", action="store_true",
                    help="only the rank 1 / 16 / 64 comparison")
    ap.add_argument("--paired", type=int, nargs="+", metavar="RANK",
                    help="only batch-1 paired overheads at these ranks")
    args = ap.parse_args()
    if args.paired:
        paired(args.paired, args.rounds, args.tokens)
        return
    if args.mixed_ranks:
        mixed_ranks(args.rounds, args.tokens)
        return
    llm = LLM("smollm2-135m", enable_lora=True, max_loras=8, kv_cache_memory="512MiB")
    arch = llm.engine.arch
    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for i in range(8):
            path = Path(tmp) / f"a{i}"
            write_adapter(path, arch, args.rank, seed=i)
            adapters.append(LoRARequest(f"a{i}", i + 1, str(path)))
        loads = []
        for a in adapters:
            t = time.perf_counter()
            llm.engine.add_lora(a)
            loads.append(time.perf_counter() - t)
        print(f"adapter load (r={args.rank}, 7 targets, 30 layers): "
              + " ".join(f"{x * 1e3:.0f}" for x in loads) + " ms")
        one = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        prompt = ["Write a short story about a lighthouse keeper."]
        decode_tok_s(llm, prompt, one, adapters[0])  # warm both paths
        decode_tok_s(llm, prompt, one, None)
        base, lora = [], []
        for _ in range(args.rounds):
            base.append(decode_tok_s(llm, prompt, one, None))
            lora.append(decode_tok_s(llm, prompt, one, adapters[0]))
        b, a = max(base), max(lora)
        print(f"batch-1 decode tok/s (best of {args.rounds}): base {b:.1f}, adapter {a:.1f}: "
              f"{(b / a - 1) * 100:+.1f}% time per token")
        prompts = [f"Request {i}: tell me about the sea." for i in range(64)]
        spread = [adapters[i % 8] for i in range(64)]
        base64, lora64 = [], []
        for _ in range(max(1, args.rounds - 1)):
            base64.append(decode_tok_s(llm, prompts, one, None))
            lora64.append(decode_tok_s(llm, prompts, one, spread))
        print(f"64 requests, output tok/s (best of {len(base64)}): base {max(base64):.1f}, "
              f"over 8 adapters {max(lora64):.1f}: {max(lora64) / max(base64):.2f}x")


if __name__ == "__main__":
    main()

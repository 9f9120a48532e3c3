"""Engine speed in one process, through the public API only, so the same file measures any
revision (`PYTHONPATH=<checkout>/src python scripts/engine_speed.py`): 512-token prefill,
batch-1 decode and batch-8 decode of the bundled model in the default configuration (or the
LLM keyword arguments given as KEY=VALUE). Prints one JSON line; best of --rounds."""
from __future__ import annotations

import argparse
import json
import random
import time

from turbollm import LLM, SamplingParams


def run(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(seconds until every request has its first token, decode tok/s after that)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", p, params)
    first = None
    generated = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first is None and outs and all(len(o.outputs[0].token_ids) for o in outs) \
                and len(outs) == len(prompts):
            first = time.perf_counter()
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
    end = time.perf_counter()
    total = len(prompts) * max_tokens
    return first - t0, (total - generated) / (end - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kwargs", nargs="*", help="LLM keyword arguments, KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    kw = dict(a.split("=", 1) for a in args.kwargs)
    llm = LLM(**kw)
    engine = llm.engine
    vocab = engine.arch.vocab_size
    rng = random.Random(0)

    def prompt(n):  # fresh tokens each time: no prefix-cache hits
        return [rng.randrange(100, vocab) for _ in range(n)]

    run(engine, [prompt(64)], 8)  # warm-up
    best = {"prefill512_s": float("inf"), "decode_b1_tok_s": 0.0, "decode_b8_tok_s": 0.0}
    for _ in range(args.rounds):
        pre, _ = run(engine, [prompt(512)], 1 + 1)
        _, d1 = run(engine, [prompt(16)], 128)
        _, d8 = run(engine, [prompt(16) for _ in range(8)], 64)
        best = {"prefill512_s": min(best["prefill512_s"], pre),
                "decode_b1_tok_s": max(best["decode_b1_tok_s"], d1),
                "decode_b8_tok_s": max(best["decode_b8_tok_s"], d8)}
    print(json.dumps({k: round(v, 4) for k, v in best.items()}))


if __name__ == "__main__":
    main()

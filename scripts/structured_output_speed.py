"""Decode speed with and without a JSON-schema constraint, in one run (bundled SmolLM2-135M):
batch 1, and batch 32 with half the requests constrained; plus grammar compile times (cold and
cached). Every request decodes exactly --tokens tokens (the schema's string is longer than
that), so the runs do equal work.

    python scripts/structured_output_speed.py [--tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

from turbollm import LLM, SamplingParams, StructuredOutputSpec as Spec

# A long string field: the answer cannot finish before --tokens tokens.
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000,
                                                     "maxLength": 4000}},
          "required": ["story"]}
PROMPT = "Tell a long story about a lighthouse keeper, as JSON."


def decode_tok_s(llm: LLM, params: list[SamplingParams]) -> float:
    t0 = time.perf_counter()
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    took = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(kv_cache_memory="256MiB", num_threads=args.threads)
    manager = llm.engine.constrained.manager
    manager.compile(Spec.json_object()).result()  # the backend's vocabulary scan, not timed
    for name, spec in (("json schema", Spec.json(SCHEMA)), ("json_object", Spec.json_object()),
                       ("regex", Spec.regex(r"[A-Z][a-z]{3,9}( [a-z]{2,8}){5,20}\."))):
        t0 = time.perf_counter()
        manager.compile(Spec(spec.kind, spec.value)).result()
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        manager.compile(Spec(spec.kind, spec.value)).result()
        print(f"compile {name}: {cold * 1e3:.2f} ms (or cached before), cached "
              f"{(time.perf_counter() - t0) * 1e6:.1f} us")
    plain = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.tokens,
                                 structured_output=Spec.json(SCHEMA))
    decode_tok_s(llm, [plain, constrained])  # warm-up
    for batch in (1, 32):
        base = [plain] * batch
        mixed = [plain] * (batch - batch // 2 or 0) + [constrained] * (batch // 2) \
            if batch > 1 else [constrained]
        a = [decode_tok_s(llm, base) for _ in range(args.repeats)]
        b = [decode_tok_s(llm, mixed) for _ in range(args.repeats)]
        label = "constrained" if batch == 1 else "half constrained"
        print(f"batch {batch}: unconstrained {max(a):.1f} tok/s, {label} {max(b):.1f} tok/s, "
              f"ratio {max(b) / max(a):.3f} (best of {args.repeats})")


if __name__ == "__main__":
    main()

"""Batch-1 decode of our engine against llama.cpp on the same GGUF file, alternating in one process.

    python -m turbollm.bench.vs_llamacpp [--threads 2] [--tokens 128] [--rounds 4] [--json F]

`turbollm bench` runs each configuration in its own process, one after another, so on this VM
(whose speed drifts by tens of percent within minutes) two rows of its table are not a fair
pair. Here the two engines decode the same prompt greedily in turns (A B / B A), and the ratio
of their best rounds is reported. Decode rate = tokens after the first / time after the first,
for both (our engine's request clock; llama-cpp-python's generator yields each token as it
is made).
"""
from __future__ import annotations

import argparse
import json

from turbollm import LLM, SamplingParams
from turbollm.bench.peers import llamacpp_greedy, load_llamacpp


def ours_rate(llm: LLM, prompt: list[int], n: int) -> float:
    sp = SamplingParams(max_tokens=n + 1, temperature=0.0, ignore_eos=True)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    m = out.metrics  # the engine's clock: first token, last token
    return (len(out.outputs[0].token_ids) - 1) / (m.finished_time - m.first_token_time)


def llamacpp_rate(lc, prompt: list[int], n: int) -> float:
    times: list[float] = []
    llamacpp_greedy(lc, prompt, n + 1, times)
    return (len(times) - 1) / (times[-1] - times[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from turbollm.loader.resolve import resolve_model
    try:
        lc = load_llamacpp(resolve_model("smollm2-135m").path, args.threads, 1024)
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python)")
        return 2
    ours = LLM("smollm2-135m", num_threads=args.threads, kv_cache_memory="256MiB",
               enable_prefix_caching=False)
    prompt = list(range(1000, 1016))
    runs = {"ours": lambda: ours_rate(ours, prompt, args.tokens),
            "llamacpp": lambda: llamacpp_rate(lc, prompt, args.tokens)}
    for run in runs.values():
        run()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for rnd in range(args.rounds):
        for name in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
            rates[name].append(runs[name]())
    ratio = max(rates["ours"]) / max(rates["llamacpp"])
    for name, r in rates.items():
        print(f"{name:9s} decode tok/s: " + ", ".join(f"{x:.1f}" for x in r))
    print(f"ours / llama.cpp (best rounds): {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "tokens": args.tokens, "rates": rates,
                       "ratio": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

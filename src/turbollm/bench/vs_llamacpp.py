"""Batch-1 decode (or prefill) of our configurations and llama.cpp on the same GGUF file,
alternating in one process.

    python -m turbollm.bench.vs_llamacpp [--configs default,bf16,int8,int4] [--no-llamacpp]
                                         [--prompt-tokens 16] [--tokens 128] [--rounds 4]
                                         [--threads 2] [--prefill] [--json F]

--prefill times the prompt instead (llama-bench's pp: `--prompt-tokens 512`): a fresh prompt
every round (no cache hit), rate = prompt tokens / time to the first token (ours: the engine's
clock from arrival; llama.cpp: eval() of the prompt).

`turbollm bench` runs each configuration in its own process, one after another, so on this VM
(whose speed drifts by tens of percent within minutes) two rows of its table are not a fair
pair. Here every engine decodes the same prompt greedily in turns (the order reversed every
other round), and ratios of their best rounds are reported. Decode rate = tokens after the
first / time after the first, for all (our engine's request clock; llama-cpp-python's
generator yields each token as it is made). Configuration names are `turbollm bench`'s
(--list-configs there).
"""
from __future__ import annotations

import argparse
import itertools
import json

from turbollm import LLM, SamplingParams
from turbollm.bench.configs import build_matrix
from turbollm.bench.measure import random_prompts
from turbollm.bench.peers import llamacpp_greedy, load_llamacpp

LLAMACPP = "llamacpp"


def ours_rate(llm: LLM, prompt: list[int], n: int) -> float:
    sp = SamplingParams(max_tokens=n + 1, temperature=0.0, ignore_eos=True)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    m = out.metrics  # the engine's clock: first token, last token
    return (len(out.outputs[0].token_ids) - 1) / (m.finished_time - m.first_token_time)


def llamacpp_rate(lc, prompt: list[int], n: int) -> float:
    times: list[float] = []
    llamacpp_greedy(lc, prompt, n + 1, times)
    return (len(times) - 1) / (times[-1] - times[0])


def ours_prefill_rate(llm: LLM, prompt: list[int]) -> float:
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0),
                       use_tqdm=False)[0]
    return len(prompt) / (out.metrics.first_token_time - out.metrics.arrival_time)


def llamacpp_prefill_rate(lc, prompt: list[int]) -> float:
    import time
    lc.reset()
    t0 = time.perf_counter()
    lc.eval(prompt)
    return len(prompt) / (time.perf_counter() - t0)


def alternate(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Each run's rate per round, the runs taken in turns (reversed every other round)."""
    for run in runs.values():
        run()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for rnd in range(rounds):
        for name in (list(runs) if rnd % 2 == 0 else list(runs)[::-1]):
            rates[name].append(runs[name]())
    return rates


def ratios(rates: dict[str, list[float]]) -> dict[str, float]:
    """Best-round ratios: each of ours against llama.cpp, and against our dense bf16 (`dense`:
    default dtype; `bf16`: dtype=bfloat16) when they ran."""
    best = {name: max(r) for name, r in rates.items()}
    out = {}
    for base in (LLAMACPP, "dense", "bf16"):
        if base in best:
            out.update({f"{name}/{base}": b / best[base] for name, b in best.items()
                        if name not in (base, LLAMACPP)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="default",
                    help="comma-separated configurations of ours (default: default)")
    ap.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=16,
                    help="prompt length (the context decode steps attend over grows from it)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prefill", action="store_true",
                    help="time the prompt (prefill tok/s) instead of decoding")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        configs = build_matrix(None, [c for c in args.configs.split(",") if c])
    except ValueError as e:
        print(e)
        return 2
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    # --prefill: a new random prompt each call (no prefix-cache hit, no KV reuse)
    prompts = (random_prompts(1, args.prompt_tokens, 49152, seed)[0]
               for seed in itertools.count())
    runs = {}
    if not args.no_llamacpp:
        from turbollm.loader.resolve import resolve_model
        try:
            lc = load_llamacpp(resolve_model("smollm2-135m").path, args.threads,
                               args.prompt_tokens + args.tokens + 8)
        except ImportError:
            print("llama-cpp-python is not installed (pip install llama-cpp-python, "
                  "or --no-llamacpp)")
            return 2
        runs[LLAMACPP] = (lambda: llamacpp_prefill_rate(lc, next(prompts))) if args.prefill \
            else (lambda: llamacpp_rate(lc, prompt, args.tokens))
    for c in configs:
        llm = LLM("smollm2-135m", **{"num_threads": args.threads, "kv_cache_memory": "256MiB",
                                     "enable_prefix_caching": False, **c.kwargs})
        runs[c.name] = (lambda llm=llm: ours_prefill_rate(llm, next(prompts))) if args.prefill \
            else (lambda llm=llm: ours_rate(llm, prompt, args.tokens))
    rates = alternate(runs, args.rounds)
    what = "prefill" if args.prefill else "decode"
    for name, r in rates.items():
        print(f"{name:12s} {what} tok/s: " + ", ".join(f"{x:.1f}" for x in r))
    ratio = ratios(rates)
    for name, x in ratio.items():
        print(f"{name} (best rounds): {x:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "prompt_tokens": args.prompt_tokens,
                       "measure": what, "system": llm.engine.system if configs else None,
                       "tokens": args.tokens, "rates": rates,
                       "ratios": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

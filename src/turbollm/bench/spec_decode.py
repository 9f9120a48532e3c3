"""Speculative decoding benchmark: verification cost, n-gram and draft speed-ups, batch 32.

    python -m turbollm.bench.spec_decode [--threads 2] [--tokens 128] [--json out.json]
        [--sections ngram,draft,batch]

On the bundled SmolLM2-135M with the engine's defaults, in one process and one run:
- the cost of a step verifying k = 0..8 proposed tokens vs a plain decode step (batch 1), as
  the n-gram engine measured it at start-up;
- batch-1 decode tok/s with n-gram prompt lookup on input-grounded prompts (summarize /
  extract / rewrite a ~512-token text from the built-in corpus) vs plain decoding;
- batch-1 decode tok/s with draft models on open-ended chat prompts vs plain decoding;
- aggregate tok/s of 32 concurrent input-grounded requests with n-gram on vs off (adaptive
  switch-off);
and the acceptance rates; for n-gram also the speed-up any controller could reach on the same
answers at the measured step costs, and at free verification (bench/spec_bound.py). Decode
tok/s counts output tokens after the first over the time after the first token, so the
(identical) prefill does not dilute the ratios. Each comparison alternates the two engines
request by request (batch 32: A B B A), as this VM's speed drifts by tens of percent within
minutes.
"""
from __future__ import annotations

import argparse
import json
import time

from turbollm import LLM, SamplingParams
from turbollm.bench.spec_bound import bounds_report
from turbollm.corpus import builtin_corpus_text

GROUNDED_TASKS = ("Summarize the following text in a few sentences.",
                  "List every Python keyword and built-in name mentioned in the text below.",
                  "Rewrite the following text in plain English, keeping every detail.")
OPEN_PROMPTS = ("Write a short story about a lighthouse keeper who finds a message in a bottle.",
                "Explain to a child why the sky is blue.",
                "Give me five ideas for a birthday party for a ten-year-old.")


def grounded_prompts(llm: LLM, n: int, text_tokens: int = 512) -> list[list[int]]:
    tok = llm.tokenizer
    corpus = builtin_corpus_text()
    out = []
    for i in range(n):
        start = 7000 * i % (len(corpus) - 20000)
        ids = tok(corpus[start:start + 6000], add_special_tokens=False).input_ids[:text_tokens]
        text = tok.decode(ids)
        task = GROUNDED_TASKS[i % len(GROUNDED_TASKS)]
        out.append(llm.apply_chat_template([{"role": "user", "content": f"{task}\n\n{text}"}]))
    return out


def open_prompts(llm: LLM) -> list[list[int]]:
    return [llm.apply_chat_template([{"role": "user", "content": p}]) for p in OPEN_PROMPTS]


def _one_decode(llm: LLM, prompt, max_tokens: int) -> tuple[int, float, list[int]]:
    """One greedy request alone: (output tokens after the first, seconds after the first token,
    output token ids); the prefill is the same with or without speculation."""
    o = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0),
                     use_tqdm=False)[0]
    m = o.metrics
    return o.num_generated_tokens - 1, m.finished_time - m.first_token_time, o.outputs[0].token_ids


def paired_rates(base: LLM, other: LLM, prompts, max_tokens: int, rounds: int = 2):
    """Batch-1 decode tok/s of two engines over the same prompts, one request after another,
    alternating A B / B A per prompt and round, so that this VM's drift (30% within minutes)
    falls on both alike. Returns ({"tok_s", "tokens"} for base, the same plus
    "acceptance_rate" for other); tokens are the last round's outputs, when both engines hold
    the same prompt blocks in their prefix caches (a prompt prefilled whole and one whose tail
    is computed over cached blocks take different attention kernels, which can flip a near
    tie in low precision, speculation or not)."""
    totals = [[0, 0.0], [0, 0.0]]
    outs: list[list[list[int]]] = [[], []]
    spec = other.engine.spec
    drafted, accepted = (spec.num_draft_tokens, spec.num_accepted_tokens) if spec else (0, 0)
    for rnd in range(rounds):
        for i, p in enumerate(prompts):
            order = (0, 1) if (rnd + i) % 2 == 0 else (1, 0)
            for which in order:
                n, secs, ids = _one_decode((base, other)[which], p, max_tokens)
                totals[which][0] += n
                totals[which][1] += secs
                if rnd == rounds - 1:
                    outs[which].append(ids)
    rate = None
    if spec and spec.num_draft_tokens > drafted:
        rate = (spec.num_accepted_tokens - accepted) / (spec.num_draft_tokens - drafted)
    res = [{"tok_s": n / secs, "tokens": o} for (n, secs), o in zip(totals, outs)]
    res[1]["acceptance_rate"] = rate
    return res[0], res[1]


def same_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two sets of greedy outputs agree. Exactly 1.0 in fp32; with
    bf16 storage or low-bit kernels, one row (plain decoding) and several (verification) sum in
    different orders, so a near tie can flip and the outputs part from there."""
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    return same / max(1, sum(len(p) for p in b))


def batch_throughput(llm: LLM, prompts, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(o.num_generated_tokens for o in outs) / (time.perf_counter() - t0)


def paired_throughput(base: LLM, other: LLM, prompts, max_tokens: int) -> tuple[float, float]:
    """Aggregate tok/s of the whole batch on each engine, measured A B B A."""
    a1 = batch_throughput(base, prompts, max_tokens)
    b1 = batch_throughput(other, prompts, max_tokens)
    b2 = batch_throughput(other, prompts, max_tokens)
    a2 = batch_throughput(base, prompts, max_tokens)
    return (a1 + a2) / 2, (b1 + b2) / 2


def ratio_entry(ref: dict, got: dict) -> dict:
    return {"plain_tok_s": ref["tok_s"], "spec_tok_s": got["tok_s"],
            "ratio": got["tok_s"] / ref["tok_s"], "acceptance_rate": got["acceptance_rate"],
            "same_tokens": same_fraction(got["tokens"], ref["tokens"])}


SECTIONS = ("ngram", "draft", "batch")


def run(threads: int, tokens: int, batch_tokens: int, sections=SECTIONS) -> dict:
    """The sections asked for; the verification costs come with every run (the n-gram
    engine measures them at start-up, and the batch section uses that engine too)."""
    base = dict(num_threads=threads)
    plain = LLM("smollm2-135m", **base)
    res: dict = {"threads": threads, "tokens": tokens}
    grounded = grounded_prompts(plain, 3)
    ngram = LLM("smollm2-135m", speculative_method="ngram", num_speculative_tokens=8, **base)
    # what the engine measured at start-up (spec_decode/step_cost.py) and its controller uses
    costs = ngram.engine.spec.controller.step_costs
    res["verify_step_costs"] = costs
    res["verify_k8_over_plain_step"] = costs[8]
    print("step verifying k = 0..8 / plain step: " + " ".join(f"{c:.2f}" for c in costs))
    if "ngram" in sections:
        _ngram_section(res, plain, ngram, grounded, tokens)
    if "draft" in sections:
        _draft_section(res, plain, tokens, base)
    if "batch" in sections:
        batch = grounded_prompts(plain, 32, 256)
        off, on = paired_throughput(plain, ngram, batch, batch_tokens)
        res["batch32"] = {"plain_tok_s": off, "ngram_tok_s": on, "ratio": on / off}
        print(f"batch 32, n-gram on/off: {on:.1f} / {off:.1f} tok/s ({on / off:.2f}x)")
    return res


def _ngram_section(res: dict, plain: LLM, ngram: LLM, grounded, tokens: int) -> None:
    ref, got = paired_rates(plain, ngram, grounded, tokens)
    res["ngram_grounded"] = entry = ratio_entry(ref, got)
    print(f"n-gram, grounded prompts: {got['tok_s']:.1f} vs {ref['tok_s']:.1f} tok/s "
          f"({entry['ratio']:.2f}x), acceptance {got['acceptance_rate']:.2f}")
    spec = ngram.engine.config.speculative
    costs = res["verify_step_costs"]
    entry["bounds"] = b = bounds_report(grounded, ref["tokens"], costs, spec.ngram_min,
                                        spec.ngram_max)
    print(f"  on these answers at these step costs: oracle controller {b['oracle']:.2f}x, "
          f"ours replayed {b['controller']:.2f}x; oracle at free verification "
          f"{b['oracle_free_verification']:.2f}x")
    for c in b["cheaper_verification"]:
        print(f"  extra cost per proposal x{c['scale']} (k = {len(costs) - 1} step "
              f"{c['max_k_step']:.2f}x plain): oracle {c['oracle']:.2f}x, ours replayed "
              f"{c['controller']:.2f}x")


def _draft_section(res: dict, plain: LLM, tokens: int, base: dict) -> None:
    chat = open_prompts(plain)
    res["draft_open"] = {"configs": {}}
    for k in (6, 12):
        name = f"self-draft {k}/30 layers"
        llm = LLM("smollm2-135m", speculative_method="draft", num_speculative_tokens=4,
                  draft_layers=k, **base)
        ref, got = paired_rates(plain, llm, chat, tokens)
        res["draft_open"]["configs"][name] = entry = ratio_entry(ref, got)
        print(f"{name}, open prompts: {got['tok_s']:.1f} vs {ref['tok_s']:.1f} tok/s "
              f"({entry['ratio']:.2f}x), acceptance {got['acceptance_rate']}")
        del llm
    # A dense bf16 target with its own Q4_1 weights (the bundled file served natively) as draft.
    # They agree on nearly every token, so up to 8 proposals per step (session 8, two runs:
    # K = 4 1.21x, K = 8 1.31x).
    dense = LLM("smollm2-135m", quantization="none", **base)
    llm = LLM("smollm2-135m", quantization="none", speculative_method="draft",
              draft_model="smollm2-135m", num_speculative_tokens=8, **base)
    ref, got = paired_rates(dense, llm, chat, tokens)
    res["draft_open"]["bf16 target, Q4_1 draft"] = entry = ratio_entry(ref, got)
    print(f"bf16 target + Q4_1 draft: {got['tok_s']:.1f} vs {ref['tok_s']:.1f} tok/s "
          f"({entry['ratio']:.2f}x), acceptance {got['acceptance_rate']}")
    del llm, dense


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="answer length, batch 1")
    ap.add_argument("--batch-tokens", type=int, default=64, help="answer length, batch 32")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="which comparisons to run, of " + ",".join(SECTIONS))
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        ap.error(f"unknown section(s): {', '.join(sorted(sections - set(SECTIONS)))}")
    res = run(args.threads, args.tokens, args.batch_tokens, sections)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

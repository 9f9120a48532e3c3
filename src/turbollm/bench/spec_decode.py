"""Speculative decoding benchmark: verification cost, n-gram and draft speed-ups, batch 32.

    python -m turbollm.bench.spec_decode [--threads 2] [--tokens 128] [--json out.json]

On the bundled SmolLM2-135M with the engine's defaults, in one process and one run:
- the cost of a step verifying K = 8 proposed tokens vs a plain decode step (batch 1);
- batch-1 decode tok/s with n-gram prompt lookup on input-grounded prompts (summarize /
  extract / rewrite a ~512-token text from the built-in corpus) vs plain decoding;
- batch-1 decode tok/s with draft models on open-ended chat prompts vs plain decoding;
- aggregate tok/s of 32 concurrent input-grounded requests with n-gram on vs off (adaptive
  switch-off);
and the acceptance rates. Decode tok/s counts output tokens after the first over the time
after the first token, so the (identical) prefill does not dilute the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from turbollm import LLM, SamplingParams
from turbollm.eval.corpus import builtin_corpus_text

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


def decode_rate(llm: LLM, prompts, max_tokens: int) -> dict:
    """Batch 1, greedy, one request after another: output tokens after the first per second
    after the first token (the prefill is the same with or without speculation)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tokens = seconds = 0.0
    outs = []
    for p in prompts:
        o = llm.generate([p], params, use_tqdm=False)[0]
        m = o.metrics
        tokens += o.num_generated_tokens - 1
        seconds += m.finished_time - m.first_token_time
        outs.append(o.outputs[0].token_ids)
    spec = llm.engine.spec
    rate = spec.num_accepted_tokens / spec.num_draft_tokens if spec and spec.num_draft_tokens \
        else None
    return {"tok_s": tokens / seconds, "tokens": outs, "acceptance_rate": rate}


def same_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two sets of greedy outputs agree. Exactly 1.0 in fp32; with
    bf16 storage or low-bit kernels, one row (plain decoding) and several (verification) sum in
    different orders, so a near tie can flip and the outputs part from there."""
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    return same / max(1, sum(len(p) for p in b))


def verify_cost(llm: LLM, k: int = 8, steps: int = 24) -> float:
    """Seconds of a step verifying k proposals over a plain decode step (batch 1, interleaved
    to share the machine's noise). The proposals are forced, whatever their acceptance."""
    eng = llm.engine
    prompt = grounded_prompts(llm, 1, 256)[0]
    eng.add_request("verify-cost", prompt, SamplingParams(max_tokens=2 * steps * (k + 1) + 8,
                                                          temperature=0.0, ignore_eos=True))
    while not any(not r.is_prefilling for r in eng.scheduler.running):
        eng.step()
    req = eng.scheduler.running[0]
    plain, verify = [], []
    for i in range(2 * steps):
        if i % 2:
            req.spec_token_ids = req.all_token_ids[-k:]  # any k tokens: the cost is the same
        t0 = time.perf_counter()
        eng.step()
        (verify if i % 2 else plain).append(time.perf_counter() - t0)
    eng.abort_request("verify-cost")
    return statistics.median(verify) / statistics.median(plain)


def batch_throughput(llm: LLM, prompts, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(o.num_generated_tokens for o in outs) / (time.perf_counter() - t0)


def run(threads: int, tokens: int, batch_tokens: int) -> dict:
    base = dict(num_threads=threads)
    plain = LLM("smollm2-135m", **base)
    res: dict = {"threads": threads, "tokens": tokens}
    res["verify_k8_over_plain_step"] = verify_cost(plain)
    print(f"verify K=8 step / plain step: {res['verify_k8_over_plain_step']:.2f}")

    grounded = grounded_prompts(plain, 3)
    ref = decode_rate(plain, grounded, tokens)
    ngram = LLM("smollm2-135m", speculative_method="ngram", num_speculative_tokens=8, **base)
    got = decode_rate(ngram, grounded, tokens)
    res["ngram_grounded"] = {"plain_tok_s": ref["tok_s"], "spec_tok_s": got["tok_s"],
                             "ratio": got["tok_s"] / ref["tok_s"],
                             "acceptance_rate": got["acceptance_rate"],
                             "same_tokens": same_fraction(got["tokens"], ref["tokens"])}
    print(f"n-gram, grounded prompts: {got['tok_s']:.1f} vs {ref['tok_s']:.1f} tok/s "
          f"({got['tok_s'] / ref['tok_s']:.2f}x), acceptance {got['acceptance_rate']:.2f}")

    chat = open_prompts(plain)
    ref = decode_rate(plain, chat, tokens)
    res["draft_open"] = {"plain_tok_s": ref["tok_s"], "configs": {}}
    drafts = {f"self-draft {k}/30 layers": dict(draft_layers=k) for k in (6, 12)}
    for name, kw in drafts.items():
        llm = LLM("smollm2-135m", speculative_method="draft", num_speculative_tokens=4,
                  **kw, **base)
        got = decode_rate(llm, chat, tokens)
        res["draft_open"]["configs"][name] = {
            "tok_s": got["tok_s"], "ratio": got["tok_s"] / ref["tok_s"],
            "acceptance_rate": got["acceptance_rate"],
            "same_tokens": same_fraction(got["tokens"], ref["tokens"])}
        print(f"{name}, open prompts: {got['tok_s']:.1f} vs {ref['tok_s']:.1f} tok/s "
              f"({got['tok_s'] / ref['tok_s']:.2f}x), acceptance {got['acceptance_rate']}")
        del llm
    # A dense bf16 target with its own Q4_1 weights (the bundled file served natively) as draft.
    dense = LLM("smollm2-135m", quantization="none", **base)
    ref_dense = decode_rate(dense, chat, tokens)
    del dense
    llm = LLM("smollm2-135m", quantization="none", speculative_method="draft",
              draft_model="smollm2-135m", num_speculative_tokens=4, **base)
    got = decode_rate(llm, chat, tokens)
    res["draft_open"]["bf16 target, Q4_1 draft"] = {
        "plain_tok_s": ref_dense["tok_s"], "tok_s": got["tok_s"],
        "ratio": got["tok_s"] / ref_dense["tok_s"], "acceptance_rate": got["acceptance_rate"],
        "same_tokens": same_fraction(got["tokens"], ref_dense["tokens"])}
    print(f"bf16 target + Q4_1 draft: {got['tok_s']:.1f} vs {ref_dense['tok_s']:.1f} tok/s "
          f"({got['tok_s'] / ref_dense['tok_s']:.2f}x), acceptance {got['acceptance_rate']}")
    del llm

    batch = grounded_prompts(plain, 32, 256)
    off = batch_throughput(plain, batch, batch_tokens)
    on = batch_throughput(ngram, batch, batch_tokens)
    res["batch32"] = {"plain_tok_s": off, "ngram_tok_s": on, "ratio": on / off}
    print(f"batch 32, n-gram on/off: {on:.1f} / {off:.1f} tok/s ({on / off:.2f}x)")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="answer length, batch 1")
    ap.add_argument("--batch-tokens", type=int, default=64, help="answer length, batch 32")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    res = run(args.threads, args.tokens, args.batch_tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

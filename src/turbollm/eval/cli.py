"""`turbollm eval`: perplexity of one configuration, or agreement between two.

    turbollm eval --model smollm2-135m --perplexity --max-tokens 4096
    turbollm eval --compare --config-a dtype=float32 --config-b quantization=int4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys


def add_eval_parser(sub) -> argparse.ArgumentParser:
    from turbollm.cli_args import add_engine_args
    p = sub.add_parser("eval", help="perplexity on a text, or agreement between two "
                                    "configurations of a model",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--perplexity", action="store_true",
                   help="sliding-window perplexity (the default when --compare is not given)")
    p.add_argument("--compare", action="store_true",
                   help="top-1 agreement, KL(a||b) and greedy agreement of --config-a vs -b")
    p.add_argument("--config-a", action="append", default=None, metavar="KEY=VALUE[,...]",
                   help="engine options of side a on top of the flags (with --compare, "
                        "default dtype=float32,quantization=none: dense fp32)")
    p.add_argument("--config-b", action="append", default=None, metavar="KEY=VALUE[,...]",
                   help="engine options of side b on top of the flags")
    p.add_argument("--text", help="a UTF-8 text file (default: the built-in corpus, "
                                  "Python's pydoc topics)")
    p.add_argument("--max-length", type=int, default=512, help="window length in tokens")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens newly scored per window (default: half the window)")
    p.add_argument("--max-tokens", type=int, default=8192,
                   help="evaluate the first N tokens of the text (0 = all)")
    p.add_argument("--prompts", type=int, default=16, help="greedy agreement: prompt count")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--json", help="write the results to this file ('-' = stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_args(p)
    p.set_defaults(func=run_eval)
    return p


def _engine_kwargs(args, overrides: dict) -> dict:
    from turbollm.cli_args import engine_kwargs
    kw = {**engine_kwargs(args), **overrides}
    if kw.get("kv_cache_memory") is None and kw.get("num_gpu_blocks_override") is None:
        # The CPU default (2 GiB, zero-filled) would dominate memory; size for what eval runs.
        tokens = max(args.max_length, args.prompts * (args.prompt_tokens + args.gen_tokens))
        kw["num_gpu_blocks_override"] = -(-tokens // kw.get("block_size", 16)) + 8
    return kw


def _text_ids(llm, args) -> list[int]:
    from turbollm.corpus import corpus_token_ids
    text = None
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    ids = corpus_token_ids(llm.tokenizer, text, args.max_tokens or None)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens")
    return ids


def run_eval(args) -> int:
    from turbollm import LLM
    from turbollm.cli_args import parse_overrides
    progress = not args.no_progress
    result: dict = {"model": args.model, "max_length": args.max_length,
                    "stride": args.stride or max(1, args.max_length // 2),
                    "text": args.text or "builtin:pydoc_data.topics"}
    if not args.compare:
        from turbollm.eval.perplexity import perplexity
        over = parse_overrides(args.config_a)
        llm = LLM(**_engine_kwargs(args, over))
        ids = _text_ids(llm, args)
        r = perplexity(llm.score_logits, ids, args.max_length, args.stride, progress)
        result.update(config=over, perplexity=r.perplexity, mean_nll=r.mean_nll,
                      num_tokens=r.num_tokens)
        print(f"perplexity {r.perplexity:.4f} (mean NLL {r.mean_nll:.4f} nats over "
              f"{r.num_tokens} tokens, window {r.max_length}, stride {r.stride})")
    else:
        result.update(compare(args, progress))
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


def compare(args, progress: bool) -> dict:
    """Both configurations loaded side by side; every measure on the same tokens."""
    from turbollm import LLM
    from turbollm.cli_args import parse_overrides
    from turbollm.eval.agreement import greedy_agreement, greedy_continuations, logit_agreement
    from turbollm.corpus import corpus_prompts
    over_a = parse_overrides(args.config_a) if args.config_a else \
        {"dtype": "float32", "quantization": "none"}  # the dense fp32 reference
    over_b = parse_overrides(args.config_b)
    if not over_b:
        raise ValueError("--compare needs --config-b (what differs from side a)")
    llm_a = LLM(**_engine_kwargs(args, over_a))
    llm_b = LLM(**_engine_kwargs(args, over_b))
    ids = _text_ids(llm_a, args)
    la = logit_agreement(llm_a.score_logits, llm_b.score_logits, ids, args.max_length,
                         args.stride, progress)
    prompts = corpus_prompts(llm_a.tokenizer, args.prompts, args.prompt_tokens)
    ga = greedy_agreement(greedy_continuations(llm_a, prompts, args.gen_tokens),
                          greedy_continuations(llm_b, prompts, args.gen_tokens))
    print(f"a = {over_a}\nb = {over_b}\n"
          f"top-1 agreement {la.top1_agreement:.4f}, mean KL(a||b) {la.mean_kl:.5f} nats "
          f"(max {la.max_kl:.4f}) over {la.num_tokens} tokens; perplexity a "
          f"{la.perplexity_a:.4f}, b {la.perplexity_b:.4f}\n"
          f"greedy: token agreement {ga.token_agreement:.4f}, prefix agreement "
          f"{ga.prefix_agreement:.4f}, exact match {ga.exact_match:.3f} "
          f"({ga.num_prompts} prompts x {args.gen_tokens} tokens)", file=sys.stdout)
    return {"config_a": over_a, "config_b": over_b, "logits": la.as_dict(),
            "greedy": ga.as_dict()}

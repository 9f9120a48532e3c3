"""Tensor / pipeline parallel decode against one process, on a ~1B-class Llama of random weights:

    python scripts/tp_speed.py [--tokens 32] [--rounds 2]

TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads) from the Llama-2-7B
preset with load_format=dummy. Batch-1 decode tok/s, and aggregate tok/s of a batch of 32, for
one process with 2 threads, TP=2 with 1 thread per rank, and PP=2 with 2 micro-batches,
alternating; plus each parallel run's collective / receive time per step, and the share of a
batch-1 generation's time the TP ranks spend in all-reduces.
"""
from __future__ import annotations

import argparse
import json
import time

from turbollm import LLM, SamplingParams
from turbollm.bench.measure import decode_tok_s

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)


def batch_tok_s(llm, n: int, tokens: int) -> float:
    prompts = [[1] + [100 + i + j for j in range(31)] for i in range(n)]
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def comm_share(llm, prompt: list[int], tokens: int) -> float | None:
    """Share of a batch-1 generation's wall time that the ranks spent in tensor-parallel
    collectives (the wait for the slower rank included), or None in one process."""
    stats = llm.engine.executor.comm_stats
    if "tp_comm_seconds" not in stats():
        return None
    before = stats()["tp_comm_seconds"]
    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                 use_tqdm=False)
    return (stats()["tp_comm_seconds"] - before) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    common = dict(model="Llama-2-7B", load_format="dummy", hf_config_overrides=SHAPE,
                  kv_cache_memory="512MiB", max_model_len=512)
    engines = {"one process, 2 threads": LLM(**common, num_threads=2),
               "TP=2, 1 thread/rank": LLM(**common, tensor_parallel_size=2,
                                          cpu_threads_per_worker=1),
               "PP=2, 2 micro-batches": LLM(**common, pipeline_parallel_size=2,
                                            cpu_threads_per_worker=1,
                                            pipeline_micro_batches=2)}
    res = {name: {"batch1": [], "batch32": [], "batch1_comm_share": []} for name in engines}
    prompt = list(range(1000, 1032))
    for r in range(args.rounds):
        order = list(engines.items()) if r % 2 == 0 else list(engines.items())[::-1]
        for name, llm in order:
            res[name]["batch1"].append(decode_tok_s(llm, prompt, args.tokens))
            if name.startswith("TP"):
                res[name]["batch1_comm_share"].append(comm_share(llm, prompt, args.tokens))
            res[name]["batch32"].append(batch_tok_s(llm, 32, args.tokens))
    for name, llm in engines.items():
        steps, extra = llm.engine.stats.steps, llm.engine.stats.extra
        if "tp_comm_seconds" in extra and steps:
            res[name]["tp_comm_ms_per_step"] = 1e3 * extra["tp_comm_seconds"] / steps
            res[name]["pp_wait_ms_per_step"] = 1e3 * extra["pp_wait_seconds"] / steps
        print(name, json.dumps(res[name]))
    for llm in engines.values():
        llm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

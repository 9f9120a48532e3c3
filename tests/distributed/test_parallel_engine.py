"""Tensor and pipeline parallelism end to end (2 CPU ranks, gloo + shared memory): logits and
greedy text match the single-process engine, and a dead rank is a clear error, not a hang."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from gguf_helpers import tiny_gguf

from turbollm import LLM, SamplingParams
from turbollm.engine.errors import ModelBrokenError
from turbollm.executor.multiproc import WorkerProcessError
from turbollm.quantization import kernels as quant_kernels

# Same blocks everywhere, so both engines schedule (chunk, cache, preempt) the same way: 10
# blocks of 16 tokens cannot hold the batch below at once, so requests are preempted.
ENGINE = dict(dtype="float32", num_gpu_blocks_override=10, block_size=16,
              max_num_batched_tokens=48, enable_prefix_caching=True,
              speculative_method="ngram", num_speculative_tokens=3, verify_cost="0.25")
SCORED = list(range(3, 70))  # 67 tokens: two chunks of 48


def _mixed_requests():
    """12 requests: a shared 40-token prefix (prefix caching), prompts of 41..63 tokens
    (chunked prefill at 48 tokens a step), repeats (n-gram proposals), 3..12 new tokens."""
    prefix = [(7 * i) % 900 + 5 for i in range(40)]
    prompts, params = [], []
    for i in range(12):
        tail = [(13 * i + 3 * j) % 700 + 11 for j in range(1 + 2 * i)]
        prompts.append(prefix + tail if i % 3 else tail * 3 + prefix[:8])
        params.append(SamplingParams(max_tokens=3 + i % 10, temperature=0, ignore_eos=True))
    return prompts, params


def _greedy(llm: LLM) -> list[list[int]]:
    prompts, params = _mixed_requests()
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def single(tiny_llama):
    llm = LLM(str(tiny_llama), **ENGINE)
    out = llm, llm.score_logits(SCORED), _greedy(llm)
    # the batch exercises what it says it does
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.spec.num_accepted_tokens > 0
    assert llm.engine.kv_manager.prefix_hits > 0
    return out


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2_micro2"])
def test_parallel_logits_and_greedy_text_match_one_process(tiny_llama, single, tp, pp):
    """(PP with 2 micro-batches: two steps in flight, each over half the running requests.)"""
    _, ref_logits, ref_text = single
    llm = LLM(str(tiny_llama), tensor_parallel_size=tp, pipeline_parallel_size=pp,
              pipeline_micro_batches=2, **ENGINE)
    try:
        logits = llm.score_logits(SCORED)
        # TP adds two partial sums per layer where one process adds one: fp32 rounding only
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-5)
        assert _greedy(llm) == ref_text
        extra = llm.engine.stats.extra
        key = "tp_comm_seconds" if tp > 1 else "pp_wait_seconds"
        assert 0 < extra[key] <= llm.engine.executor.comm_stats()[key]
        assert llm.engine.system["parallel"].startswith(f"tp={tp} pp={pp}")
        # every rank's decode steps ran the one-call C decode loop (TP: all-reducing from C;
        # PP: each stage its own layers)
        runs = llm.engine.executor.native_decode_runs()
        assert all(r["c_loop"] > 0 for r in runs) and runs[0] == runs[1], runs
        if pp > 1:  # two steps were out at once
            assert llm.engine.steps_in_flight == 2 and llm.engine.stats.overlapped_steps > 0
    finally:
        llm.shutdown()
    assert not any(p.is_alive() for p in llm.engine.executor.procs)


def test_tp_replicates_kv_heads_when_fewer_than_ranks(tiny_llama):
    """One KV head, two ranks: each rank keeps the KV head its query heads read (random
    weights of the whole model drawn as one process draws them, then sliced)."""
    kw = dict(dtype="float32", load_format="dummy", num_gpu_blocks_override=16,
              hf_config_overrides={"num_key_value_heads": 1}, native_decode=False)
    ref = LLM(str(tiny_llama), **kw).score_logits(SCORED[:20])
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, **kw)
    try:
        got = llm.score_logits(SCORED[:20])
    finally:
        llm.shutdown()
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6 * float(ref.abs().max()) + 1e-9)


def test_tp_quantizes_each_slice_like_one_process(tiny_llama):
    """int4 at load under TP: each rank quantizes its slice of the dense weights. The slices
    are 32 columns wide, so the engine picks group size 32; one process with groups of 32
    quantizes the same groups, hence the same logits. The int8 KV cache's scales are per token
    and head, and a rank holds whole heads: the same values too."""
    # (exact activations: few-row GEMVs otherwise round activations in blocks of a row, and a
    # row-parallel rank's row is half a row)
    # (50 tokens in chunks of 24: the later chunks read earlier KV back from the int8 cache)
    kw = dict(dtype="float32", quantization="int4", num_gpu_blocks_override=16,
              exact_activations=True, kv_cache_dtype="int8", max_num_batched_tokens=24)
    try:
        ref = LLM(str(tiny_llama), quantization_group_size=32, **kw).score_logits(SCORED[:50])
    finally:  # a process-wide switch: leave it as the other tests expect
        quant_kernels.exact_activations(False)
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, **kw)
    try:
        got = llm.score_logits(SCORED[:50])
    finally:
        llm.shutdown()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_tp_serves_gguf_blocks_sliced_whole(tmp_path, tiny_llama):
    """Native GGUF under TP: each rank takes its rows and whole 32-column blocks of the Q4_1 /
    Q8_0 tensors, so it runs the same int4/int8 blocks as one process, split."""
    path = tiny_gguf(tmp_path / "tiny.gguf")
    kw = dict(tokenizer=str(tiny_llama), dtype="float32", num_gpu_blocks_override=16,
              exact_activations=True)
    try:
        one = LLM(str(path), **kw)
        ref = one.score_logits(SCORED[:20])
        methods = {n: m.quant_method.name for n, m in
                   one.engine.executor.worker.model.named_modules() if hasattr(m, "quant_method")}
    finally:
        quant_kernels.exact_activations(False)
    assert methods["model.layers.0.mlp.down_proj"] == "int4" and methods["lm_head"] == "int8"
    llm = LLM(str(path), tensor_parallel_size=2, **kw)
    try:
        got = llm.score_logits(SCORED[:20])
        ranks = llm.engine.executor.linear_methods()
    finally:
        llm.shutdown()
    assert ranks == [methods, methods]  # packed blocks on every rank, not dense slices
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_a_dead_rank_is_a_clear_error_and_stops_the_others(tiny_llama):
    llm = LLM(str(tiny_llama), tensor_parallel_size=2, dtype="float32",
              num_gpu_blocks_override=16, distributed_timeout_s=20)
    procs = llm.engine.executor.procs
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ModelBrokenError, match=r"rank 1 \(pid \d+\) died"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))
    assert time.monotonic() - t0 < 15  # noticed from the process, not from a timeout
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="died"):  # and stays an error
        llm.score_logits([1, 2])


def test_a_rank_that_cannot_start_gives_one_clear_message(tiny_llama):
    """3 attention heads cannot be split over 2 ranks: the ranks' own error, named, and no
    process left behind."""
    with pytest.raises(WorkerProcessError, match=r"rank \d failed to start: ValueError: "
                       r"tensor_parallel_size 2 must divide the model's 3 attention heads"):
        LLM(str(tiny_llama), tensor_parallel_size=2, load_format="dummy",
            hf_config_overrides={"num_attention_heads": 3, "num_key_value_heads": 1,
                                 "head_dim": 16})

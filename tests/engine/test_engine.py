"""The engine end to end on a tiny random Llama (fp32): batching, preemption, prefix cache,
n > 1, seeds, stop strings, abort, validation."""
import random

import pytest

from turbollm import LLM, SamplingParams
from turbollm.engine.errors import ContextLengthExceededError, RequestValidationError


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_memory="16MiB", block_size=16,
               max_num_seqs=64, max_num_batched_tokens=256)


def mixed_requests(n=32, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 90))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, 40), temperature=0, ignore_eos=True)
              for _ in range(n)]
    return prompts, params


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def assert_no_blocks_held(llm):
    pool = llm.engine.kv_manager.pool
    pool.check_invariant()
    assert pool.num_used == 0 and pool.num_free + pool.num_cached == pool.num_blocks


def test_batch_invariance_32_mixed(llm):
    prompts, params = mixed_requests()
    together = tokens(llm.generate(prompts, params))
    alone = [tokens(llm.generate([p], q))[0] for p, q in zip(prompts, params)]
    assert together == alone
    assert [len(t) for t in together] == [p.max_tokens for p in params]
    assert_no_blocks_held(llm)


def test_batch_invariance_under_preemption(llm, tiny_llama):
    prompts, params = mixed_requests(seed=1)
    expected = tokens(llm.generate(prompts, params))
    small = LLM(str(tiny_llama), dtype="float32", block_size=16, max_num_seqs=64,
                max_num_batched_tokens=128, num_gpu_blocks_override=14)
    got = tokens(small.generate(prompts, params))
    assert small.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert_no_blocks_held(small)


def test_prefix_cache_hits_and_same_output(llm, tiny_llama):
    system = "You are a helpful assistant. Answer briefly and precisely. " * 4
    prompts = [system + q for q in ("What is 2+2?", "Name a color.", "Say hi.")]
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kv = llm.engine.kv_manager
    first = tokens(llm.generate(prompts[:1], p))
    hits_before = kv.prefix_hits
    outs = llm.generate(prompts, p)
    assert kv.prefix_hits - hits_before >= 2 * 48  # the shared system prompt is not recomputed
    assert outs[0].metrics.num_cached_tokens > 0
    no_cache = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="16MiB",
                   enable_prefix_caching=False)
    assert tokens(no_cache.generate(prompts, p)) == tokens(outs)
    assert tokens(outs)[:1] == first
    assert no_cache.engine.kv_manager.prefix_hits == 0


def test_n_greater_than_one_shares_prompt_and_seeds(llm):
    prompt = "Tell me a story about a dragon who " * 5
    p = SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    hits_before = llm.engine.kv_manager.prefix_hits
    out = llm.generate([prompt], p)[0]
    assert len(out.outputs) == 4 and [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert llm.engine.kv_manager.prefix_hits - hits_before >= 3 * 16  # siblings reuse blocks
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different seeds per child
    again = llm.generate([prompt], p)[0]
    assert tokens_n(again) == tokens_n(out)


def tokens_n(out):
    return [o.token_ids for o in out.outputs]


def test_n_with_the_largest_seed_wraps_instead_of_failing(llm):
    """Children take seed + i; past 2**64 - 1 (the largest seed the API takes) it wraps to 0
    rather than failing the step (and every request in it) in torch's generator."""
    p = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=2**64 - 1, ignore_eos=True)
    out = llm.generate(["a b c"], p)[0]
    second = llm.generate(["a b c"], SamplingParams(max_tokens=4, temperature=1.0, seed=0,
                                                    ignore_eos=True))[0]
    assert out.outputs[1].token_ids == second.outputs[0].token_ids


def test_seed_reproducible_whatever_the_batch(llm):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = tokens(llm.generate(["Hello world"], p))[0]
    noise = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)] * 5
    mixed = llm.generate(["a b c", "Hello world", "x", "yy zz", "q", "r s"],
                         [noise[0], p] + noise[1:])
    assert mixed[1].outputs[0].token_ids == alone


def test_stop_strings_and_stop_tokens(llm):
    free = llm.generate(["Once upon a time"], SamplingParams(max_tokens=30, temperature=0,
                                                             ignore_eos=True))[0].outputs[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    out = llm.generate(["Once upon a time"], SamplingParams(
        max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.index(stop)]
    kept = llm.generate(["Once upon a time"], SamplingParams(
        max_tokens=30, temperature=0, ignore_eos=True, stop=[stop],
        include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == free.text[:free.text.index(stop) + len(stop)]
    tok = free.token_ids[4]
    out = llm.generate(["Once upon a time"], SamplingParams(
        max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids[-1] == tok and out.stop_reason == tok
    assert len(out.token_ids) == free.token_ids.index(tok) + 1
    assert_no_blocks_held(llm)


def test_min_tokens_and_length_finish(llm):
    out = llm.generate(["Hi"], SamplingParams(max_tokens=5, min_tokens=5, temperature=0))[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_logprobs_returned(llm):
    out = llm.generate(["Hi there"], SamplingParams(max_tokens=4, temperature=0, logprobs=3,
                                                   ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, pos in zip(out.token_ids, out.logprobs):
        assert pos.sampled.token_id == tok and pos.sampled.rank == 1  # greedy = most likely
        assert len(pos.top) == 3 and pos.top[0].token_id == tok
        assert pos.top[0].logprob >= pos.top[1].logprob >= pos.top[2].logprob
    assert out.cumulative_logprob == pytest.approx(sum(p.sampled.logprob for p in out.logprobs))


def test_abort_frees_blocks_at_any_time(llm):
    eng = llm.engine
    for i in range(6):
        eng.add_request(f"ab{i}", "some prompt text " * (i + 1),
                        SamplingParams(max_tokens=50, ignore_eos=True))
    eng.abort_request("ab5")  # still waiting
    eng.step()
    eng.abort_request("ab0")  # running
    for _ in range(3):
        eng.step()
    for i in range(1, 5):
        eng.abort_request(f"ab{i}")
    assert not eng.has_unfinished_requests()
    assert_no_blocks_held(llm)


def test_bad_requests_raise_clear_errors(llm):
    eng = llm.engine
    with pytest.raises(ContextLengthExceededError):
        eng.add_request("x1", [5] * eng.max_model_len, SamplingParams())
    with pytest.raises(ContextLengthExceededError, match="max_tokens"):
        eng.add_request("x2", [5] * 10, SamplingParams(max_tokens=eng.max_model_len))
    with pytest.raises(RequestValidationError, match="empty"):
        eng.add_request("x3", [], SamplingParams())
    with pytest.raises(RequestValidationError, match="token ids"):
        eng.add_request("x4", [10**9], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    assert not eng.has_unfinished_requests()


def test_engine_step_error_fails_only_its_requests(llm, monkeypatch):
    eng = llm.engine
    eng.add_request("boom", "hello", SamplingParams(max_tokens=3))
    real = eng.executor.execute

    def broken(so):
        raise RuntimeError("injected failure")
    monkeypatch.setattr(eng.executor, "execute", broken)
    outs = eng.step()
    assert outs and outs[0].finished and outs[0].outputs[0].finish_reason == "error"
    assert "injected failure" in outs[0].error
    monkeypatch.setattr(eng.executor, "execute", real)
    assert_no_blocks_held(llm)
    ok = llm.generate(["hello"], SamplingParams(max_tokens=3, temperature=0))
    assert len(ok[0].outputs[0].token_ids) == 3

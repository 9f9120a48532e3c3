"""The prompt budget of steps that run beside decoding requests, from measured step times."""
import pytest

from turbollm.config import SchedulerConfig
from turbollm.core.kv_cache_manager import KVCacheManager
from turbollm.core.request import Request
from turbollm.core.scheduler import Scheduler
from turbollm.core.stall_budget import MIN_TOKENS, StallBudget
from turbollm.sampling_params import SamplingParams


def test_no_budget_before_a_decode_step_then_a_small_start_until_a_mixed_step():
    b = StallBudget(2.0)
    assert b.tokens(3) is None
    b.observe(0, 512, 0.5)  # a prefill-only step says nothing about decode steps
    assert b.tokens(3) is None
    b.observe(3, 0, 0.012)
    assert b.tokens(3) == MIN_TOKENS


def test_a_step_stays_within_the_stall_of_a_decode_only_step():
    b = StallBudget(2.0)
    for _ in range(30):
        b.observe(4, 0, 0.012)      # decode-only: 12 ms at 4 decode tokens
        b.observe(4, 20, 0.032)     # 20 prompt tokens added 20 ms: 1 ms each
    assert b.tokens(4) == 12        # (2 - 1) * 12 ms / 1 ms
    assert StallBudget(3.0).tokens(4) is None
    b3 = StallBudget(3.0)
    for _ in range(30):
        b3.observe(4, 0, 0.012)
        b3.observe(4, 20, 0.032)
    assert b3.tokens(4) == 24       # a looser bound lets twice as many in


def test_the_budget_grows_with_the_decode_batch_and_uses_the_nearest_timed_size():
    b = StallBudget(2.0)
    for _ in range(30):
        b.observe(2, 0, 0.010)
        b.observe(32, 0, 0.060)
        b.observe(2, 10, 0.020)
    assert b.tokens(2) == 10
    assert b.tokens(32) == 60       # long decode steps: prompts are not starved
    assert b.tokens(3) == b.tokens(2)  # untimed sizes: the nearest, fewer rows first
    assert b.tokens(30) == b.tokens(32)


def test_noise_never_stops_a_prompt():
    b = StallBudget(2.0)
    b.observe(1, 0, 0.010)
    b.observe(1, 8, 0.009)  # a mixed step timed faster than the decode average
    assert b.tokens(1) >= MIN_TOKENS


def _sched(stall: float):
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256,
                          prefill_chunk_while_decoding=64, max_decode_stall=stall)
    return Scheduler(cfg, KVCacheManager(256, 4, False), 1000)


def _req(rid, prompt, max_tokens):
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), [0], max_tokens)


def test_the_scheduler_sizes_chunks_from_its_budget_and_falls_back_without_times():
    s = _sched(2.0)
    s.add_request(_req("dec", [5], 50))
    s.update(s.schedule(), [7])  # "dec" decodes from now on
    s.add_request(_req("big", list(range(1, 200)), 1))
    out = s.schedule()  # nothing timed yet: the static rule's 64 tokens
    assert out.num_scheduled_tokens == [1, 64]
    s.update(out, [7, None])
    for _ in range(30):
        s.stall.observe(1, 0, 0.008)
        s.stall.observe(1, 16, 0.024)  # 1 ms a prompt token
    out = s.schedule()
    assert out.num_scheduled_tokens == [1, 8]  # (2 - 1) * 8 ms / 1 ms
    off = _sched(0)
    assert off.stall is None


def test_max_decode_stall_is_checked():
    with pytest.raises(ValueError, match="max_decode_stall"):
        SchedulerConfig(max_decode_stall=0.5)


def test_the_engine_times_its_steps_into_the_budget(tiny_llama):
    from turbollm.engine.llm_engine import LLMEngine
    eng = LLMEngine.from_kwargs(model=str(tiny_llama), max_num_batched_tokens=64,
                                kv_cache_memory="8MiB", max_decode_stall=2.0)
    eng.add_request("a", list(range(3, 10)), SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(3):
        eng.step()
    eng.add_request("b", list(range(10, 150)), SamplingParams(max_tokens=2, ignore_eos=True))
    eng.run_until_done()
    stall = eng.scheduler.stall
    assert 1 in stall.decode_s and stall.decode_s[1] > 0  # decode-only steps of "a"
    assert stall.tokens(1) is not None and stall._tokens > 0  # "b"'s chunks beside "a"

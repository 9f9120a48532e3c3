"""Scheduler scenarios without a model: a fake model whose next token depends only on the
sequence so far, so any schedule (batched, chunked, preempted) must give the same outputs."""
import random

import pytest

from turbollm.config import SchedulerConfig
from turbollm.core.kv_cache_manager import KVCacheManager
from turbollm.core.request import Request, RequestStatus
from turbollm.core.scheduler import Scheduler
from turbollm.sampling_params import SamplingParams

EOS = 0


def fake_next_token(tokens):
    return (sum(tokens) * 31 + len(tokens)) % 97 + 1  # never EOS


def make_sched(num_blocks=64, block_size=4, max_seqs=8, budget=32, chunked=True, caching=True,
               max_len=1000, chunk_while_decoding=0):
    kv = KVCacheManager(num_blocks, block_size, caching)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          enable_chunked_prefill=chunked,
                          prefill_chunk_while_decoding=chunk_while_decoding)
    return Scheduler(cfg, kv, max_len)


def req(rid, prompt, max_tokens, leader=None):
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), [EOS], max_tokens,
                   prefix_leader=leader)


def run(sched, max_steps=10_000, on_step=None):
    """Drive the scheduler with the fake model; returns {id: output tokens} and step records."""
    results, steps = {}, []
    for step in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(out.requests) <= sched.config.max_num_seqs
        assert len({r.request_id for r in out.requests}) == len(out.requests)
        steps.append(out)
        sampled = []
        for r, n in zip(out.requests, out.num_scheduled_tokens):
            assert n >= 1
            assert r.num_computed_tokens + n <= r.num_tokens
            sampled.append(fake_next_token(r.all_token_ids) if
                           r.num_computed_tokens + n == r.num_tokens else None)
        _, finished = sched.update(out, sampled)
        for r in finished:
            results[r.request_id] = list(r.output_token_ids)
        sched.kv.check_invariant()
        if on_step:
            on_step(step, sched)
    else:
        raise AssertionError("scheduler did not finish (deadlock?)")
    return results, steps


def step_once(sched):
    out = sched.schedule()
    sampled = [fake_next_token(r.all_token_ids) if r.num_computed_tokens + n == r.num_tokens
               else None for r, n in zip(out.requests, out.num_scheduled_tokens)]
    sched.update(out, sampled)
    sched.kv.check_invariant()
    return out


def add_random_requests(sched, seed, n=12):
    """n requests of random prompts (4-20 tokens) and lengths (10-24 new tokens), added to
    sched; {id: (prompt, max_tokens)}."""
    rng = random.Random(seed)
    specs = {f"r{i}": ([rng.randrange(1, 90) for _ in range(rng.randint(4, 20))],
                       rng.randint(10, 24)) for i in range(n)}
    for rid, (p, m) in specs.items():
        sched.add_request(req(rid, p, m))
    return specs


def expected(prompt, max_tokens):
    toks, out = list(prompt), []
    for _ in range(max_tokens):
        t = fake_next_token(toks)
        toks.append(t)
        out.append(t)
    return out


def test_all_finish_with_right_outputs_and_blocks_returned():
    rng = random.Random(0)
    s = make_sched()
    specs = {f"r{i}": ([rng.randrange(1, 90) for _ in range(rng.randint(1, 40))],
                       rng.randint(1, 20)) for i in range(20)}
    for rid, (p, m) in specs.items():
        s.add_request(req(rid, p, m))
    results, _ = run(s)
    assert results == {rid: expected(p, m) for rid, (p, m) in specs.items()}
    assert s.kv.pool.num_used == 0
    assert s.kv.pool.num_free + s.kv.pool.num_cached == s.kv.pool.num_blocks


def test_requests_join_and_leave_every_step():
    s = make_sched(max_seqs=4, budget=64)
    s.add_request(req("long", [1, 2, 3], 30))
    s.add_request(req("short", [4, 5], 2))
    joined_at = {}

    def add_late(step, sched):
        if step == 5:
            sched.add_request(req("late", [7, 8, 9], 3))
            joined_at["late"] = step
    results, steps = run(s, on_step=add_late)
    ids_per_step = [{r.request_id for r in o.requests} for o in steps]
    assert "short" not in ids_per_step[4]  # finished after its 2 tokens, left the batch
    assert "late" in ids_per_step[6] and "long" in ids_per_step[6]  # joined a running batch
    assert results["late"] == expected([7, 8, 9], 3)


def test_chunked_prefill_never_stalls_decodes():
    s = make_sched(budget=8, num_blocks=128)
    s.add_request(req("dec", [1, 2], 40))
    step_once(s)  # "dec" is decoding from now on
    s.add_request(req("big", list(range(1, 60)), 2))
    decode_steps = 0
    while s.has_unfinished_requests():
        out = s.schedule()
        ids = [r.request_id for r in out.requests]
        if "big" in ids and s.requests["big"].is_prefilling:
            assert "dec" in ids  # every step that prefills a chunk of "big" also decodes "dec"
            assert out.num_scheduled_tokens[ids.index("big")] <= 7
            decode_steps += 1
        sampled = [fake_next_token(r.all_token_ids) if r.num_computed_tokens + n == r.num_tokens
                   else None for r, n in zip(out.requests, out.num_scheduled_tokens)]
        s.update(out, sampled)
        s.kv.check_invariant()
    assert decode_steps >= 7  # 59 prompt tokens in chunks of at most 7


def test_prompts_take_small_chunks_only_while_others_decode():
    s = make_sched(budget=64, num_blocks=128, chunk_while_decoding=20)  # 20 > 16 per decode
    s.add_request(req("first", list(range(1, 81)), 2))
    out = step_once(s)
    assert out.num_scheduled_tokens == [64]  # nobody decodes yet: the whole budget
    step_once(s)
    assert not s.requests["first"].is_prefilling
    s.add_request(req("a", list(range(100, 130)), 2))  # no prefix shared with "first"
    s.add_request(req("b", list(range(200, 230)), 2))
    out = step_once(s)  # "first" decodes its last token
    assert [r.request_id for r in out.requests] == ["first", "a"]
    assert out.num_scheduled_tokens == [1, 20]  # 20 prompt tokens in all
    out = step_once(s)  # "first" finished: nobody decodes, the prompts take what they need
    assert [r.request_id for r in out.requests] == ["a", "b"]
    assert out.num_scheduled_tokens == [10, 30]
    results, _ = run(s)
    assert results == {"a": expected(list(range(100, 130)), 2),
                       "b": expected(list(range(200, 230)), 2)}


def test_the_prompt_share_grows_with_the_decoding_requests():
    from turbollm.core.scheduler import PREFILL_TOKENS_PER_DECODE as per_decode
    s = make_sched(budget=200, num_blocks=512, max_seqs=16, chunk_while_decoding=5)
    for i in range(6):
        s.add_request(req(f"d{i}", [10 * i + 1], 50))
    step_once(s)  # six one-token prompts: all decoding from now on
    s.add_request(req("big", list(range(1, 150)), 1))
    out = step_once(s)
    assert out.num_scheduled_tokens == [1] * 6 + [max(5, 6 * per_decode)]


def test_no_chunking_waits_for_budget():
    s = make_sched(budget=16, chunked=False)
    s.add_request(req("a", list(range(1, 10)), 1))
    s.add_request(req("b", list(range(1, 10)), 1))
    out = s.schedule()
    assert [r.request_id for r in out.requests] == ["a"]  # b's 9 tokens don't fit in the 7 left


@pytest.mark.parametrize("num_blocks", [12, 16, 24])
def test_preemption_by_recompute_same_outputs(num_blocks):
    s = make_sched(num_blocks=num_blocks, block_size=4, max_seqs=8, budget=64)
    specs = add_random_requests(s, seed=num_blocks)
    results, _ = run(s)
    assert s.num_preemptions > 0
    assert results == {rid: expected(p, m) for rid, (p, m) in specs.items()}
    assert s.kv.pool.num_used == 0


def test_abort_anywhere_frees_blocks():
    rng = random.Random(1)
    s = make_sched(num_blocks=20, budget=16)
    for i in range(10):
        s.add_request(req(f"r{i}", [rng.randrange(1, 90) for _ in range(12)], 30))
    for step in range(12):
        out = s.schedule()
        sampled = [fake_next_token(r.all_token_ids) if r.num_computed_tokens + n == r.num_tokens
                   else None for r, n in zip(out.requests, out.num_scheduled_tokens)]
        if step == 3:  # abort a running one and a waiting one while a step is "in flight"
            victims = [out.requests[0].request_id] + [r.request_id for r in list(s.waiting)[:1]]
            done = s.finish_requests(victims, RequestStatus.FINISHED_ABORTED)
            assert all(r.status == RequestStatus.FINISHED_ABORTED for r in done)
        s.update(out, sampled)
        s.kv.check_invariant()
    s.finish_requests(list(s.requests), RequestStatus.FINISHED_ABORTED)
    s.kv.check_invariant()
    assert s.kv.pool.num_used == 0 and not s.has_unfinished_requests()


def test_prefix_cache_hits_on_repeated_prompt():
    s = make_sched(block_size=4)
    system = list(range(1, 30))
    s.add_request(req("a", system + [50], 3))
    run(s)
    s.add_request(req("b", system + [60], 3))
    out = s.schedule()
    b = s.requests["b"]
    assert b.num_cached_tokens == 28  # 7 full blocks of the shared system prompt
    assert out.num_scheduled_tokens == [30 - 28]
    assert s.kv.prefix_hits >= 28


def test_n_siblings_share_leader_prompt_blocks():
    s = make_sched(block_size=4, budget=64)
    prompt = list(range(1, 22))
    leader = req("p#0", prompt, 4)
    s.add_request(leader)
    for i in (1, 2):
        s.add_request(req(f"p#{i}", prompt, 4, leader=leader))
    first = s.schedule()
    assert [r.request_id for r in first.requests] == ["p#0"]  # siblings wait for the leader
    s.update(first, [fake_next_token(r.all_token_ids) for r in first.requests])
    second = s.schedule()
    sib = {r.request_id: n for r, n in zip(second.requests, second.num_scheduled_tokens)}
    assert sib["p#1"] == 1 and sib["p#2"] == 1  # 20 of 21 prompt tokens came from the cache
    assert s.requests["p#1"].num_cached_tokens == 20
    s.kv.check_invariant()


def test_max_model_len_finishes_with_length():
    s = make_sched(max_len=10)
    r = req("a", [1, 2, 3], 100)
    s.add_request(r)
    run(s)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.num_tokens == 10


@pytest.mark.parametrize("num_blocks", [12, 24, 64])
def test_steps_in_flight_split_the_running_requests_and_give_the_same_outputs(num_blocks):
    """Pipeline parallelism's schedule (engine/llm_engine.py step): two steps out at once,
    each over about half the running requests; a request in flight gets no work and is never
    preempted; outputs equal the plain schedule's, with preemptions where blocks are short."""
    import math
    from collections import deque

    s = make_sched(num_blocks=num_blocks, block_size=4, max_seqs=8, budget=64)
    specs = add_random_requests(s, seed=num_blocks)
    results, in_flight, halves = {}, deque(), 0
    while s.has_unfinished_requests() or in_flight:
        while len(in_flight) < 2:
            busy = {r.request_id for out, _ in in_flight for r in out.requests}
            share = max(1, math.ceil((len(s.running) + len(s.waiting)) / 2))
            out = s.schedule(busy, share)
            assert len(out.requests) <= share
            if out.is_empty:
                break
            ids = {r.request_id for r in out.requests}
            assert not ids & busy and not {r.request_id for r in out.preempted} & busy
            halves += bool(in_flight)  # a second step out beside the first
            # the fake model's tokens as of the launch (a request in flight does not change)
            sampled = [fake_next_token(r.all_token_ids) if r.num_computed_tokens + n ==
                       r.num_tokens else None
                       for r, n in zip(out.requests, out.num_scheduled_tokens)]
            in_flight.append((out, sampled))
        assert in_flight, "nothing schedulable and nothing in flight (deadlock)"
        out, sampled = in_flight.popleft()
        _, finished = s.update(out, sampled)
        for r in finished:
            results[r.request_id] = list(r.output_token_ids)
        s.kv.check_invariant()
    assert results == {rid: expected(p, m) for rid, (p, m) in specs.items()}
    assert s.kv.pool.num_used == 0
    if num_blocks == 64:  # room for all: two steps were out at once
        assert halves > 0
    if num_blocks == 12:
        assert s.num_preemptions > 0

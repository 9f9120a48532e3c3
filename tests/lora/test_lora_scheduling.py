"""Adapters in the torch-free core: the scheduler's max_loras admission and the prefix cache's
per-adapter block hashes (no model)."""
from __future__ import annotations

from turbollm.config import SchedulerConfig
from turbollm.core.batch import step_batch
from turbollm.core.kv_cache_manager import KVCacheManager
from turbollm.core.lora_request import LoRARequest
from turbollm.core.request import Request
from turbollm.core.scheduler import Scheduler
from turbollm.sampling_params import SamplingParams

A, B, C = (LoRARequest(n, i, f"/adapters/{n}") for i, n in enumerate("abc", start=1))


def _request(rid: str, lora, tokens=None) -> Request:
    return Request(rid, tokens or list(range(1, 9)), SamplingParams(max_tokens=4), [], 4,
                   lora_request=lora)


def _scheduler(max_loras: int, blocks: int = 64) -> Scheduler:
    kv = KVCacheManager(blocks, 4)
    return Scheduler(SchedulerConfig(max_num_seqs=16), kv, 256, max_loras=max_loras)


def _run_step(s: Scheduler) -> list[Request]:
    out = s.schedule()
    s.update(out, [[7] if r.num_computed_tokens + n >= r.num_tokens else None
                   for r, n in zip(out.requests, out.num_scheduled_tokens)])
    return out.requests


def test_at_most_max_loras_adapters_run_and_the_rest_wait():
    s = _scheduler(max_loras=2)
    reqs = [_request("a1", A), _request("b1", B), _request("base", None), _request("c1", C),
            _request("a2", A)]
    for r in reqs:
        s.add_request(r)
    first = _run_step(s)
    # c1 waits (two adapters already run); a2 and the base request are not held up by it
    assert [r.request_id for r in first] == ["a1", "b1", "base", "a2"]
    assert [r.request_id for r in s.waiting] == ["c1"]
    seen_c = False
    while s.has_unfinished_requests():
        step = _run_step(s)
        ids = {r.lora_request.lora_int_id for r in step if r.lora_request is not None}
        assert len(ids) <= 2 and len(s.running_lora_ids()) <= 2
        seen_c |= C.lora_int_id in ids
        s.kv.check_invariant()
    assert seen_c  # admitted once a slot freed up


def test_no_limit_without_lora():
    s = _scheduler(max_loras=0)
    for i, lora in enumerate([A, B, C]):
        s.add_request(_request(f"r{i}", lora))
    assert len(s.schedule().requests) == 3


def test_step_batch_carries_the_adapter_as_plain_data():
    s = _scheduler(max_loras=4)
    s.add_request(_request("a", A))
    s.add_request(_request("base", None))
    batch = step_batch(s.schedule(), [])
    assert [w.lora for w in batch.sequences] == [A, None]
    import pickle
    assert pickle.loads(pickle.dumps(batch)).sequences[0].lora == A


def test_block_hashes_differ_per_adapter():
    kv = KVCacheManager(64, 4)
    tokens = list(range(100, 116))
    same_id_other_dir = LoRARequest("a", 1, "/elsewhere/a")
    chains = {name: kv._block_hashes(_request(name, lora, tokens))
              for name, lora in [("base", None), ("a", A), ("b", B), ("a2", same_id_other_dir)]}
    for x in chains:
        for y in chains:
            if x != y:  # no block of one chain is any block of another
                assert not set(chains[x]) & set(chains[y]), (x, y)
    assert kv._block_hashes(_request("a_again", A, tokens)) == chains["a"]


def test_prefix_hits_only_within_one_adapter():
    kv = KVCacheManager(64, 4)
    tokens = list(range(100, 117))
    first = _request("a1", A, tokens)
    kv.allocate_slots(first, len(tokens))
    first.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(first)
    assert kv.get_computed_blocks(_request("b1", B, tokens))[1] == 0
    assert kv.get_computed_blocks(_request("base", None, tokens))[1] == 0
    assert kv.get_computed_blocks(_request("a2", A, tokens))[1] == 16

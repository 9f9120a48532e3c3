"""BlockPool and KVCacheManager without a model: counts, ref counts, prefix hits, LRU."""
import pytest

from turbollm.core.block_pool import BlockPool, hash_block
from turbollm.core.kv_cache_manager import KVCacheManager
from turbollm.core.request import Request
from turbollm.sampling_params import SamplingParams


def make_req(rid, tokens, max_tokens=8):
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), [0], max_tokens)


def test_allocate_release_counts():
    pool = BlockPool(8)
    a = pool.allocate(3)
    assert (pool.num_free, pool.num_cached, pool.num_used) == (5, 0, 3)
    pool.release(a)
    assert (pool.num_free, pool.num_cached, pool.num_used) == (8, 0, 0)
    pool.check_invariant()
    with pytest.raises(RuntimeError):
        pool.allocate(9)


def test_hashed_blocks_become_cached_and_evict_lru_last():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks):
        pool.register_full_block(b, hash_block(None, [i]))
    pool.release(blocks[:2])  # 0, 1 cached (0 least recent)
    assert (pool.num_free, pool.num_cached, pool.num_used) == (0, 2, 2)
    pool.check_invariant()
    got = pool.allocate(1)[0]
    assert got is blocks[0]  # LRU evicted first
    assert pool.lookup(hash_block(None, [0])) is None  # its hash is forgotten
    assert pool.lookup(hash_block(None, [1])) is blocks[1]
    pool.check_invariant()


def test_touch_revives_cached_block():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    h = hash_block(None, [7, 8])
    pool.register_full_block(b, h)
    pool.release([b])
    assert pool.num_cached == 1
    pool.touch([b])
    assert (pool.num_cached, pool.num_used, b.ref_cnt) == (0, 1, 1)
    pool.touch([b])  # a second sharer
    assert (pool.num_used, b.ref_cnt) == (1, 2)
    pool.release([b])
    pool.release([b])
    assert pool.num_cached == 1
    pool.check_invariant()


def test_chain_hash_depends_on_prefix():
    a = hash_block(None, [1, 2])
    b = hash_block(hash_block(None, [9, 9]), [1, 2])
    assert a != b
    assert hash_block(None, [1, 2]) == a


def test_prefix_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    r1 = make_req("a", list(range(12)))
    assert kv.allocate_slots(r1, 12)
    r1.num_computed_tokens = 12
    kv.cache_full_blocks(r1)
    kv.free(r1)
    kv.check_invariant()
    assert kv.pool.num_cached == 3
    # Same 12 tokens: only 2 blocks (8 tokens) may be hit, the last token must be recomputed.
    r2 = make_req("b", list(range(12)))
    hits, n = kv.get_computed_blocks(r2)
    assert n == 8 and len(hits) == 2
    # A longer prompt sharing the prefix hits all 3 blocks.
    r3 = make_req("c", list(range(12)) + [99, 98])
    hits3, n3 = kv.get_computed_blocks(r3)
    assert n3 == 12
    assert kv.allocate_slots(r3, 2, hits3)
    assert kv.block_ids("c")[:3] == [b.block_id for b in hits3]
    kv.check_invariant()
    # Different first token: no hit at all.
    r4 = make_req("d", [5] + list(range(1, 12)))
    assert kv.get_computed_blocks(r4)[1] == 0


def test_allocate_fails_without_change_when_full():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    r1 = make_req("a", list(range(10)))
    assert kv.allocate_slots(r1, 10)  # 3 blocks
    r2 = make_req("b", list(range(100, 110)))
    before = (kv.pool.num_free, kv.pool.num_used)
    assert not kv.allocate_slots(r2, 10)
    assert (kv.pool.num_free, kv.pool.num_used) == before
    kv.check_invariant()


def test_shared_blocks_counted_once():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    r1 = make_req("a", [1, 2, 3, 4, 5])
    assert kv.allocate_slots(r1, 5)
    r1.num_computed_tokens = 5
    kv.cache_full_blocks(r1)
    r2 = make_req("b", [1, 2, 3, 4, 6])
    hits, n = kv.get_computed_blocks(r2)
    assert n == 4
    assert kv.allocate_slots(r2, 1, hits)
    assert kv.pool.num_used == 3 + 1  # two shared blocks + one private each
    kv.check_invariant()
    kv.free(r1)
    kv.free(r2)
    kv.check_invariant()
    assert kv.pool.num_used == 0

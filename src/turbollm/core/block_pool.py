"""BlockPool: the KV blocks' free list, reference counts and prefix-cache hash map (no torch).

A block is in exactly one of three states:
  used    ref_cnt > 0                       (held by one or more running requests)
  cached  ref_cnt == 0 and has a hash       (evictable, LRU order; a prefix hit revives it)
  free    ref_cnt == 0 and no hash          (handed out first)
so free + cached + used == total always holds; tests check it after every scenario.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and its tokens are known


def hash_block(parent_hash: bytes | None, token_ids: list[int], extra_key: bytes = b"") -> bytes:
    """Chain hash of a full block: depends on every token before it (through the parent)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or b"root")
    h.update(extra_key)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockPool:
    """Owns all KV blocks; hands them out, takes them back, remembers full ones by hash."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: deque[KVBlock] = deque(self.blocks)
        self._cached_lru: OrderedDict[int, KVBlock] = OrderedDict()  # block_id -> block
        # hash -> every block holding that prefix (block_id -> block): two requests that
        # computed the same prefix at once both register it, so the prefix stays findable
        # while either copy lives (vLLM v1 keeps several blocks per hash the same way)
        self._hash_to_blocks: dict[bytes, dict[int, KVBlock]] = {}
        self.num_used = 0

    # ----- counts -----
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached_lru)

    @property
    def num_available(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return len(self._free) + len(self._cached_lru)

    def check_invariant(self) -> None:
        """The three states, the lists and the prefix-cache hash map agree (O(blocks); tests only).

        free + cached + used == total; the free list is exactly the unhashed unreferenced blocks
        (each once: a block listed twice would be handed out twice); the LRU is exactly the
        hashed unreferenced ones; the hash map holds exactly the hashed blocks, each under its
        own hash, so a lookup never returns a block whose KV is another prefix, and no hashed
        block is lost to lookups.
        """
        assert len(self.blocks) == self.num_blocks
        for i, b in enumerate(self.blocks):
            assert b.block_id == i, (i, b.block_id)
            assert b.ref_cnt >= 0, (b.block_id, b.ref_cnt)
        used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        assert used == self.num_used, (used, self.num_used)
        assert self.num_free + self.num_cached + self.num_used == self.num_blocks
        free_ids = [b.block_id for b in self._free]
        assert len(set(free_ids)) == len(free_ids), f"a block is twice in the free list: {free_ids}"
        assert all(self.blocks[b.block_id] is b for b in self._free)
        assert set(free_ids) == {b.block_id for b in self.blocks
                                 if b.ref_cnt == 0 and b.block_hash is None}
        for block_id, b in self._cached_lru.items():
            assert self.blocks[block_id] is b, (block_id, b.block_id)
        assert set(self._cached_lru) == {b.block_id for b in self.blocks
                                         if b.ref_cnt == 0 and b.block_hash is not None}
        for h, copies in self._hash_to_blocks.items():
            assert copies, f"an empty entry for a hash is left in the map"
            for block_id, b in copies.items():
                assert self.blocks[block_id] is b, block_id
                assert b.block_hash == h, f"hash map entry points at block {block_id} of another hash"
        for b in self.blocks:
            if b.block_hash is not None:
                assert self._hash_to_blocks.get(b.block_hash, {}).get(b.block_id) is b, \
                    f"block {b.block_id} has a hash but is not among the map's entries for it"
        if not self.enable_caching:
            assert not self._hash_to_blocks

    # ----- allocation -----
    def allocate(self, n: int) -> list[KVBlock]:
        """Take n blocks (plain free ones first, then evict least-recently-used cached ones)."""
        if n > self.num_available:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_available} available")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                _, block = self._cached_lru.popitem(last=False)
                self._forget_hash(block)
            block.ref_cnt = 1
            out.append(block)
        self.num_used += n
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take one more reference on blocks found in the prefix cache."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._cached_lru[block.block_id]
                self.num_used += 1
            block.ref_cnt += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop one reference on each block; unreferenced ones become cached (if hashed) or free.

        Pass a request's blocks in reverse order so its tail blocks are evicted first.
        """
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} released twice"
            if block.ref_cnt == 0:
                self.num_used -= 1
                if block.block_hash is not None:
                    self._cached_lru[block.block_id] = block
                else:
                    self._free.append(block)

    # ----- prefix cache -----
    def lookup(self, block_hash: bytes) -> KVBlock | None:
        """A block holding this prefix: one in use if any (no revival needed), else a cached one."""
        copies = self._hash_to_blocks.get(block_hash)
        if not copies:
            return None
        return next((b for b in copies.values() if b.ref_cnt > 0), next(iter(copies.values())))

    def register_full_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Record a just-filled block under its chain hash so later prompts can reuse it."""
        if not self.enable_caching or block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._hash_to_blocks.setdefault(block_hash, {})[block.block_id] = block

    def _forget_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            copies = self._hash_to_blocks.get(block.block_hash)
            if copies is not None:
                copies.pop(block.block_id, None)
                if not copies:
                    del self._hash_to_blocks[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        """Drop every cached (unreferenced) block back to the free list."""
        while self._cached_lru:
            _, block = self._cached_lru.popitem(last=False)
            self._forget_hash(block)
            self._free.append(block)

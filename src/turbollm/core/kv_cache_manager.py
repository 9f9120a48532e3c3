"""KVCacheManager: which blocks each request holds, and prefix-cache hits (policy, no torch).

The BlockPool is the mechanism (free list, ref counts, hash map); this class decides what a
request gets: its block table, the blocks it can reuse from earlier prompts, and when its full
blocks become reusable by others.
"""
from __future__ import annotations

from turbollm.core.block_pool import BlockPool, KVBlock, hash_block
from turbollm.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Block tables per request on top of one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # chain hashes of the request's full blocks
        self._num_registered: dict[str, int] = {}  # how many leading blocks are in the cache map
        # Prefix-cache statistics (tokens): looked up vs found, for the hit rate.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ----- queries -----
    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._blocks.get(request_id, ()))

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running requests."""
        return self.pool.num_used / self.pool.num_blocks

    def _block_hashes(self, req: Request) -> list[bytes]:
        """Chain hashes of every full block of the request's tokens (extended incrementally)."""
        hashes = self._hashes.setdefault(req.request_id, [])
        bs = self.block_size
        tokens = req.all_token_ids
        # KV depends on the adapter too: blocks of different adapters never match. In the
        # first block's hash, so through the chain in every later one.
        lora = b"" if req.lora_request is None else req.lora_request.cache_key
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            # the salt and the adapter enter the first block; the chain carries them on
            hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs],
                                     req.cache_salt + lora if parent is None else b""))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """Longest run of the request's leading full blocks already in the cache.

        At least one token is always left to compute, since its logits are needed; a request
        that wants prompt logprobs computes its whole prompt (cached KV has no logits).
        """
        if not self.enable_prefix_caching or req.needs_prompt_logprobs:
            return [], 0
        hits: list[KVBlock] = []
        limit = req.num_tokens - 1
        for i, h in enumerate(self._block_hashes(req)):
            if (i + 1) * self.block_size > limit:
                break
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # ----- allocation -----
    def allocate_slots(self, req: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens of KV; False (and no change) if it can't.

        `computed_blocks` are prefix hits (from get_computed_blocks) to attach first.
        """
        computed_blocks = computed_blocks or []
        held = self._blocks.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(0, needed - len(held) - len(computed_blocks))
        # Hits sitting in the cached LRU are counted in num_available; reviving them uses it up.
        num_revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_available:
            return False
        self.pool.touch(computed_blocks)
        held.extend(computed_blocks)
        if computed_blocks:
            self._num_registered[req.request_id] = len(held)
        held.extend(self.pool.allocate(num_new_blocks))
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly completed blocks so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        held = self._blocks.get(req.request_id)
        if not held:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(held))
        start = self._num_registered.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(req)
        for i in range(start, num_full):
            self.pool.register_full_block(held[i], hashes[i])
        self._num_registered[req.request_id] = num_full

    def free(self, req: Request) -> None:
        """Give back every block of the request (tail first, so the tail is evicted first)."""
        held = self._blocks.pop(req.request_id, None)
        if held:
            self.pool.release(list(reversed(held)))
        self._num_registered.pop(req.request_id, None)
        if req.is_finished:
            self._hashes.pop(req.request_id, None)

    def check_invariant(self) -> None:
        """The pool's own invariant, plus the block tables agree with it (O(table entries)).

        - every block's ref count is the number of block tables holding it (a block shared by a
          prefix hit, e.g. an n > 1 child attaching its leader's prompt blocks, is in several
          tables and counted once per table), and no table holds a block twice;
        - a hashed block at table index i carries the chain hash of the holder's own tokens of
          block i (a shared block's KV is the same prefix for everyone holding it);
        - only the leading `_num_registered` blocks of a table can be hashed: the manager
          registers leading full blocks, and hits are attached first.
        """
        pool = self.pool
        pool.check_invariant()
        refs = [0] * pool.num_blocks
        for rid, held in self._blocks.items():
            ids = [b.block_id for b in held]
            assert len(set(ids)) == len(ids), f"request {rid} holds a block twice: {ids}"
            hashes = self._hashes.get(rid, [])
            num_registered = self._num_registered.get(rid, 0)
            assert num_registered <= len(held), (rid, num_registered, len(held))
            for i, b in enumerate(held):
                assert pool.blocks[b.block_id] is b, (rid, b.block_id)
                refs[b.block_id] += 1
                if b.block_hash is not None:
                    assert i < num_registered, (rid, i, num_registered)
                    assert i < len(hashes) and b.block_hash == hashes[i], \
                        f"request {rid} block {i} (id {b.block_id}) has another prefix's hash"
        for b in pool.blocks:
            assert b.ref_cnt == refs[b.block_id], \
                f"block {b.block_id}: ref_cnt {b.ref_cnt} but held by {refs[b.block_id]} tables"
        assert set(self._num_registered) <= set(self._blocks)

"""KVCacheManager (and its BlockPool) driven through random request lifecycles by Hypothesis.

The machine plays the scheduler's part with the manager's public calls: admit a waiting request
(prefix lookup + allocate_slots), compute prefill chunks and decodes (allocate_slots,
cache_full_blocks, append a token), finish, preempt and re-admit, n > 1 children sharing their
leader's prompt blocks, eviction pressure, prefix-cache reset. After every rule
`check_invariant()` runs (ref counts == block-table membership, hash map == blocks' hashes, LRU ==
cached blocks), and the rules assert what a small reference model can know without reading the
pool's internals:

- a successful allocation leaves the table at ceil(tokens / block_size) blocks, prefix hits
  first; a failed one changes nothing, and fails only when the blocks it needs are not there;
- prefix hits are bounded below by the prefixes the model saw registered with no eviction since
  (a re-admitted prompt, or an n > 1 child after its leader's prefill, gets its hit), and above
  by the prefixes ever registered; the last token is never a hit;
- allocating past the free blocks evicts exactly the shortfall from the cached ones.
"""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from turbollm.core.kv_cache_manager import KVCacheManager, cdiv
from turbollm.core.request import Request, RequestStatus
from turbollm.sampling_params import SamplingParams

EOS = 0
# Shared prompt heads so later prompts hit blocks of earlier ones; tokens 1..4 make suffixes and
# outputs collide often too. Token ids >= 1000 (eviction fillers) never collide with these.
PREFIXES = [[], list(range(1, 13)), list(range(1, 9)) + [4, 4, 4, 4], [3] * 10]
TOKENS = st.integers(1, 4)
PICK = st.integers(0, 10**6)  # index into a list, modulo its length (shrinks towards the first)
# How often the interesting checks had teeth, over all examples (asserted after the run, so a
# change that stops the machine reaching them fails instead of passing vacuously).
COVERAGE: Counter = Counter()


class KVMachine(RuleBasedStateMachine):

    @initialize(num_blocks=st.integers(6, 32), block_size=st.sampled_from([1, 2, 4]),
                caching=st.sampled_from([True, True, True, False]))
    def setup(self, num_blocks, block_size, caching):
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.caching = caching
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.next_id = 0
        self.next_filler = 1000
        # Reference model of the prefix cache, keyed by content (all tokens up to a block's end,
        # which is what the chain hash stands for): `sure` were registered with no eviction or
        # reset since, so a lookup must find them; `ever` were registered at some point, so no
        # lookup can find anything else.
        self.sure: set[tuple[int, ...]] = set()
        self.ever: set[tuple[int, ...]] = set()

    # ----- helpers -----
    def _new_request(self, prompt, max_tokens, leader=None, prompt_logprobs=None):
        rid = f"r{self.next_id}"
        self.next_id += 1
        params = SamplingParams(max_tokens=max_tokens, prompt_logprobs=prompt_logprobs)
        req = Request(rid, prompt, params, [EOS], max_tokens, prefix_leader=leader)
        self.waiting.append(req)
        return req

    def _key(self, req, i):
        return tuple(req.all_token_ids[:(i + 1) * self.bs])

    def _leading_run(self, req, known):
        """How many of the request's leading full blocks are in `known`, capped like a lookup."""
        if not self.caching or req.needs_prompt_logprobs:
            return 0
        limit = (req.num_tokens - 1) // self.bs  # one token is always left to compute
        n = 0
        while n < limit and self._key(req, n) in known:
            n += 1
        return n

    def _allocate(self, req, num_new, hits=()):
        """allocate_slots with the model's checks around it; returns its result."""
        pool = self.kv.pool
        held_before = self.kv.block_ids(req.request_id)
        counts_before = (pool.num_free, pool.num_cached, pool.num_used)
        computed = req.num_computed_tokens + len(hits) * self.bs
        needed_new = max(0, cdiv(computed + num_new, self.bs) - len(held_before) - len(hits))
        revived = sum(1 for b in hits if b.ref_cnt == 0)  # cached hits leave the LRU
        ok = self.kv.allocate_slots(req, num_new, list(hits))
        # It refuses exactly when the new blocks plus the revived hits exceed free + cached.
        assert ok == (needed_new + revived <= counts_before[0] + counts_before[1])
        held = self.kv.block_ids(req.request_id)
        if not ok:
            assert held == held_before
            assert (pool.num_free, pool.num_cached, pool.num_used) == counts_before
            return False
        # ceil(tokens / block_size); never shorter than before (speculative lookahead slots
        # allocated by an earlier step stay in the table until the request is freed).
        assert len(held) == max(len(held_before), cdiv(computed + num_new, self.bs))
        assert held[:len(held_before)] == held_before  # a table only grows at its end
        assert held[len(held_before):len(held_before) + len(hits)] == [b.block_id for b in hits]
        if needed_new > counts_before[0]:
            COVERAGE["allocation evicted cached blocks"] += 1
            # Past the free list: the shortfall came out of the cached blocks (LRU eviction),
            # so the model can no longer be sure which prefixes are still findable.
            assert pool.num_cached == counts_before[1] - revived - (needed_new - counts_before[0])
            self.sure.clear()
        return True

    def _compute(self, req, n):
        """The forward pass ran n tokens of the request: what Scheduler.update does after it."""
        old = req.num_computed_tokens
        req.num_computed_tokens += n
        if req.params.prompt_logprobs is not None:  # the runner scored these prompt positions
            req.num_prompt_logprobs = max(req.num_prompt_logprobs,
                                          min(req.num_computed_tokens, req.num_prompt_tokens) - 1)
        self.kv.cache_full_blocks(req)
        if self.caching:
            # Blocks completed by this chunk are now in the hash map (every copy is registered
            # under its hash, test_a_copy_computed_at_the_same_time_stays_findable_...).
            for i in range(old // self.bs, req.num_computed_tokens // self.bs):
                self.sure.add(self._key(req, i))
                self.ever.add(self._key(req, i))

    def _admit(self, req, chunk):
        hits, num_hit = self.kv.get_computed_blocks(req)
        assert num_hit == len(hits) * self.bs
        lo, hi = self._leading_run(req, self.sure), self._leading_run(req, self.ever)
        assert lo <= len(hits) <= hi, (lo, len(hits), hi)
        if lo:
            COVERAGE["preempted request re-admitted with a required hit" if req.num_preemptions
                     else "n > 1 child with a required hit on its leader's blocks"
                     if req.prefix_leader is not None else "new prompt with a required hit"] += 1
        n = min(chunk, req.num_tokens - num_hit)
        assert n >= 1
        if not self._allocate(req, n, hits):
            return
        self.waiting.remove(req)
        self.running.append(req)
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = num_hit
        self._compute(req, n)
        self._maybe_sample(req, EOS + 1)

    def _maybe_sample(self, req, token):
        """If every token's KV is computed, sample one (its own KV is computed next step)."""
        if req.num_computed_tokens < req.num_tokens:
            return
        req.append_output_token(token)
        self.kv.cache_full_blocks(req)  # no new full block: nothing new was computed
        if req.num_output_tokens >= req.max_tokens:
            self._finish(req, RequestStatus.FINISHED_LENGTH)

    def _finish(self, req, status):
        (self.running if req in self.running else self.waiting).remove(req)
        req.status = status
        self.kv.free(req)
        assert self.kv.num_blocks_of(req.request_id) == 0

    # ----- rules -----
    @rule(head=st.sampled_from(range(len(PREFIXES))), tail=st.lists(TOKENS, max_size=9),
          max_tokens=st.integers(1, 6), prompt_logprobs=st.sampled_from([None] * 7 + [1]))
    def add_request(self, head, tail, max_tokens, prompt_logprobs):
        prompt = PREFIXES[head] + tail
        if prompt:
            self._new_request(prompt, max_tokens, prompt_logprobs=prompt_logprobs)

    @rule(tail=st.lists(TOKENS, min_size=1, max_size=12), n=st.integers(2, 4))
    def add_group(self, tail, n):
        """n > 1: a leader and children with its prompt; children wait for its prefill."""
        leader = self._new_request(PREFIXES[1] + tail, 4)
        for _ in range(n - 1):
            self._new_request(PREFIXES[1] + tail, 4, leader=leader)

    @precondition(lambda self: self.waiting)
    @rule(pick=PICK, chunk=st.integers(1, 16))
    def admit(self, pick, chunk):
        """Admit a waiting request (new or preempted) with a first prefill chunk."""
        ready = [r for r in self.waiting if r.prefix_leader is None
                 or r.prefix_leader.is_finished or not r.prefix_leader.is_prefilling]
        if ready:
            self._admit(ready[pick % len(ready)], chunk)

    @precondition(lambda self: self.running)
    @rule(pick=PICK, chunk=st.integers(1, 16), lookahead=st.sampled_from([0, 0, 0, 2]),
          token=TOKENS)
    def step(self, pick, chunk, lookahead, token):
        """One scheduler step for a running request: the next prefill chunk or a decode (with
        speculative lookahead slots sometimes: allocated past the tokens, never registered)."""
        req = self.running[pick % len(self.running)]
        n = min(chunk, req.num_tokens - req.num_computed_tokens)
        assert n >= 1  # a running request always has its last token left to compute
        la = lookahead if req.num_computed_tokens + n == req.num_tokens else 0
        if self._allocate(req, n + la):
            self._compute(req, n)
            self._maybe_sample(req, token)

    @precondition(lambda self: self.running or self.waiting)
    @rule(pick=PICK, aborted=st.booleans())
    def finish(self, pick, aborted):
        """A request ends (stop string or abort), running or still waiting."""
        live = self.running + self.waiting
        status = RequestStatus.FINISHED_ABORTED if aborted else RequestStatus.FINISHED_STOPPED
        self._finish(live[pick % len(live)], status)

    @precondition(lambda self: self.running)
    @rule(pick=PICK, readmit=st.booleans())
    def preempt(self, pick, readmit):
        """Drop a running request's KV (recompute later), optionally re-admitting it at once:
        with nothing allocated in between, every registered block of it must be a hit."""
        req = self.running.pop(pick % len(self.running))
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.insert(0, req)
        assert self.kv.num_blocks_of(req.request_id) == 0
        if readmit:
            # Nothing was allocated since the free, so nothing was evicted: `_admit` checks that
            # every registered full block of it (bar the last token's) is a hit.
            self._admit(req, 16)

    @precondition(lambda self: self.kv.pool.num_cached > 0)
    @rule(extra=st.integers(1, 8))
    def evict(self, extra):
        """Admit a request of fresh tokens that needs more blocks than are free, so cached
        blocks are evicted (LRU first); `_allocate` checks exactly the shortfall goes."""
        pool = self.kv.pool
        num_blocks = pool.num_free + min(extra, pool.num_cached)
        prompt = list(range(self.next_filler, self.next_filler + num_blocks * self.bs))
        self.next_filler += len(prompt)
        req = self._new_request(prompt, 2)  # stays running after its first token
        cached_before = pool.num_cached
        self._admit(req, len(prompt))  # whole prompt in one chunk: num_blocks blocks, no hits
        assert req.status == RequestStatus.RUNNING
        assert pool.num_cached == cached_before - min(extra, cached_before)
        assert pool.num_free == 0

    @rule()
    def reset_prefix_cache(self):
        self.kv.pool.reset_prefix_cache()
        assert self.kv.pool.num_cached == 0
        self.sure.clear()

    # ----- after every rule -----
    @invariant()
    def consistent(self):
        if not hasattr(self, "kv"):
            return
        self.kv.check_invariant()
        for req in self.waiting:
            assert self.kv.num_blocks_of(req.request_id) == 0  # waiting holds nothing
        for req in self.running:
            # A slot for every computed token (a just-sampled token's slot comes next step).
            assert self.kv.num_blocks_of(req.request_id) >= cdiv(req.num_computed_tokens,
                                                                 self.bs)
            assert req.num_computed_tokens < req.num_tokens
        assert self.kv.pool.num_used <= sum(self.kv.num_blocks_of(r.request_id)
                                            for r in self.running)

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for req in self.running + self.waiting:
            self._finish(req, RequestStatus.FINISHED_ABORTED)
        self.kv.check_invariant()
        pool = self.kv.pool
        assert pool.num_used == 0 and pool.num_free + pool.num_cached == pool.num_blocks
        assert not self.kv._blocks and not self.kv._num_registered and not self.kv._hashes


def test_kv_cache_manager_stateful():
    COVERAGE.clear()
    run_state_machine_as_test(KVMachine, settings=settings(
        max_examples=200, stateful_step_count=50, deadline=None, derandomize=True,
        database=None, suppress_health_check=[HealthCheck.too_slow,
                                              HealthCheck.filter_too_much]))
    for what in ("preempted request re-admitted with a required hit",
                 "n > 1 child with a required hit on its leader's blocks",
                 "new prompt with a required hit", "allocation evicted cached blocks"):
        assert COVERAGE[what] > 0, (what, dict(COVERAGE))


def test_a_copy_computed_at_the_same_time_stays_findable_once_the_first_is_evicted():
    """Found by the machine above when the hash map kept one block per hash: the second copy
    stayed private for good, so evicting the first lost the prefix while a request still held
    its KV. Now every copy is registered under the hash."""
    kv = KVCacheManager(num_blocks=10, block_size=2)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    a, b = (Request(rid, prompt, SamplingParams(max_tokens=4), [EOS], 4) for rid in "ab")
    # Two identical prompts prefill in the same step (neither can hit the other yet).
    assert kv.allocate_slots(a, 7) and kv.allocate_slots(b, 7)
    a.num_computed_tokens = b.num_computed_tokens = 7
    kv.cache_full_blocks(a)
    kv.cache_full_blocks(b)  # b's three full blocks are copies of a's, registered as well
    a.status = RequestStatus.FINISHED_ABORTED
    kv.free(a)  # a's three hashed blocks are now cached (evictable)
    filler = Request("c", list(range(100, 112)), SamplingParams(max_tokens=4), [EOS], 4)
    assert kv.allocate_slots(filler, 12)  # 6 blocks > 3 free: evicts a's cached blocks
    kv.check_invariant()
    # b still holds the KV of the prompt's 3 full blocks; a new identical prompt should hit them
    # (at most 3 blocks, since its last token is always computed).
    d = Request("d", prompt, SamplingParams(max_tokens=4), [EOS], 4)
    assert kv.get_computed_blocks(d)[1] == 6

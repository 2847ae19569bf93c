"""Tests for KVCacheManager: unit cases, then a hypothesis state machine.

The state machine models the device KV cache as ``content[block_id][slot] =
(salt, tokens up to and including that position)``: the manager is correct
iff every request only ever reads back slots written for exactly its own
prefix, whatever mix of prefix hits, forks, copy-on-write, evictions,
preemptions and swaps happened in between.
"""

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jpaged.cache import NULL_BLOCK_ID, KVCacheManager, hash_block_tokens


def snapshot(m: KVCacheManager):
    """Everything an allocation could mutate (for 'None changes nothing')."""
    return (
        [b.block_id for b in m.pool.free_block_queue],
        [(b.ref_cnt, b.block_hash) for b in m.pool.blocks],
        {r: [b.block_id for b in bs] for r, bs in m.req_to_blocks.items()},
        {h: b.block_id for h, b in m.pool.cached_block_hash_to_block.items()},
        list(m._pending_copies),
        {r: list(h) for r, h in m.req_to_host_blocks.items()},
        m.num_used_host_blocks,
    )


def prefill(m: KVCacheManager, rid: str, tokens: list[int], salt: str | None = None):
    ids, n = m.get_computed_blocks(rid, tokens, salt)
    return m.allocate_slots(rid, tokens, n, len(tokens) - n, ids, salt), ids, n


# ------------------------------------------------------------------ unit tests
def test_allocation_grows_across_block_boundaries():
    m = KVCacheManager(num_blocks=10, block_size=4)
    tokens = list(range(5))
    assert m.allocate_slots("a", tokens, 0, 5) == [1, 2]
    assert m.num_free_blocks == 7 and m.usage == pytest.approx(2 / 9)
    for n in range(5, 8):  # decode into the partially filled second block
        tokens.append(100 + n)
        assert m.allocate_slots("a", tokens, n, 1) == [1, 2]
    tokens.append(9)
    assert m.allocate_slots("a", tokens, 8, 1) == [1, 2, 3]
    assert m.get_block_ids("a") == [1, 2, 3]
    assert m.num_blocks_needed(9) == 3 and m.num_blocks_needed(8) == 2
    assert m.can_fit_ever(36) and not m.can_fit_ever(37)


def test_prefix_hit_shares_full_blocks_and_recomputes_last_token():
    m = KVCacheManager(num_blocks=20, block_size=4)
    prompt = list(range(10))
    blocks_a, _, _ = prefill(m, "a", prompt)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (10, 0)
    ids, n = m.get_computed_blocks("b", prompt + [77, 78])
    assert ids == blocks_a[:2] and n == 8
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (22, 8)
    # A prompt that is exactly cached drops its last block: one token recomputed.
    ids, n = m.get_computed_blocks("c", prompt[:8])
    assert ids == blocks_a[:1] and n == 4
    ids, n = m.get_computed_blocks("d", prompt[:4])
    assert ids == [] and n == 0
    # The lookup is pure: no ref count moved.
    assert [m.pool.blocks[i].ref_cnt for i in blocks_a] == [1, 1, 1]
    blocks_b = m.allocate_slots("b", prompt + [77, 78], 8, 4, ids := blocks_a[:2])
    assert blocks_b[:2] == ids and blocks_b[2] not in blocks_a
    assert [m.pool.blocks[i].ref_cnt for i in blocks_a] == [2, 2, 1]


def test_different_suffix_or_salt_misses():
    m = KVCacheManager(num_blocks=20, block_size=4)
    prefill(m, "a", list(range(9)), salt="tenant-1")
    assert m.get_computed_blocks("b", list(range(9)), "tenant-2") == ([], 0)
    assert m.get_computed_blocks("c", list(range(9))) == ([], 0)
    assert m.get_computed_blocks("d", list(range(9)), "tenant-1")[1] == 8
    assert m.get_computed_blocks("e", [0, 1, 2, 99] + list(range(4, 9)), "tenant-1")[1] == 0


def test_caching_disabled_never_hits():
    m = KVCacheManager(num_blocks=10, block_size=4, enable_caching=False)
    prefill(m, "a", list(range(9)))
    assert m.get_computed_blocks("b", list(range(9))) == ([], 0)
    assert not m.pool.cached_block_hash_to_block


def test_lru_evicts_tails_first_and_least_recently_freed_first():
    m = KVCacheManager(num_blocks=8, block_size=2)
    a, _, _ = prefill(m, "a", [1, 1, 2, 2, 3, 3, 9])  # 3 full blocks + 1 partial
    b, _, _ = prefill(m, "b", [5, 5, 6])
    m.free("a")
    m.free("b")
    # a's tail first, a's head later, b (freed last) at the very end.
    assert [x.block_id for x in m.pool.free_block_queue] == [7] + a[::-1] + b[::-1]
    # Two new blocks evict the empty one and a's partial tail: a's 3-block prefix survives.
    prefill(m, "c", [8, 8, 8])
    assert m.get_computed_blocks("a2", [1, 1, 2, 2, 3, 3, 4])[1] == 6
    # One more evicts a's last full block, the prefix head still hits.
    prefill(m, "d", [7])
    assert m.get_computed_blocks("a3", [1, 1, 2, 2, 3, 3, 4])[1] == 4
    assert m.get_computed_blocks("b2", [5, 5, 6])[1] == 2


def test_freed_then_hit_blocks_are_revived():
    m = KVCacheManager(num_blocks=6, block_size=2)
    a, _, _ = prefill(m, "a", [1, 2, 3, 4, 5])
    m.free("a")
    assert m.num_free_blocks == 5
    blocks, ids, n = prefill(m, "b", [1, 2, 3, 4, 6])
    assert ids == a[:2] and n == 4 and blocks[:2] == a[:2]
    assert m.num_free_blocks == 2  # two revived, one new
    assert all(m.pool.blocks[i].ref_cnt == 1 for i in blocks)
    assert not any(m.pool.free_block_queue.contains(m.pool.blocks[i]) for i in blocks)


def test_failed_allocation_changes_nothing():
    m = KVCacheManager(num_blocks=5, block_size=2)
    prefill(m, "a", [1, 2, 3, 4, 5])  # 3 blocks
    m.free("a")
    prefill(m, "x", [9, 9])  # takes the never-used block; 3 free, 2 of them a's full blocks
    before = snapshot(m)
    # Two revived blocks + two new ones > 3 free: refused although 2 new fit.
    ids, n = m.get_computed_blocks("b", [1, 2, 3, 4, 5, 6, 7, 8])
    assert n == 4
    assert m.allocate_slots("b", [1, 2, 3, 4, 5, 6, 7, 8], n, 4, ids) is None
    assert m.allocate_slots("x", [9, 9, 9, 9, 9, 9, 9, 9, 9], 2, 7) is None
    assert snapshot(m) == before
    assert m.get_block_ids("b") == []
    assert m.allocate_slots("b", [1, 2, 3, 4, 5, 6], n, 2, ids) is not None


def test_fork_copy_on_write():
    m = KVCacheManager(num_blocks=10, block_size=4)
    parent = [1, 2, 3, 4, 5, 6]
    blocks, _, _ = prefill(m, "p", parent)
    m.fork("p", "c")
    assert m.get_block_ids("c") == blocks
    assert [m.pool.blocks[i].ref_cnt for i in blocks] == [2, 2]
    # Both write position 6, inside the shared, partially filled last block.
    child_blocks = m.allocate_slots("c", parent + [8], 6, 1)
    assert child_blocks[0] == blocks[0] and child_blocks[1] != blocks[1]
    assert m.take_pending_copies() == [(blocks[1], child_blocks[1])]
    assert m.take_pending_copies() == []
    assert m.allocate_slots("p", parent + [7], 6, 1) == blocks  # now sole owner
    assert m.take_pending_copies() == []
    assert [m.pool.blocks[i].ref_cnt for i in blocks] == [2, 1]
    # Once full, each last block is hashed with its own tokens.
    m.allocate_slots("p", parent + [7, 9], 7, 1)
    m.allocate_slots("c", parent + [8, 9], 7, 1)
    assert m.get_computed_blocks("q", parent + [7, 9, 0])[0] == blocks
    assert m.get_computed_blocks("r", parent + [8, 9, 0])[0] == child_blocks


def test_fork_at_block_boundary_needs_no_copy():
    m = KVCacheManager(num_blocks=10, block_size=4)
    blocks, _, _ = prefill(m, "p", [1, 2, 3, 4])
    m.fork("p", "c")
    assert m.allocate_slots("c", [1, 2, 3, 4, 6], 4, 1)[:1] == blocks
    assert m.take_pending_copies() == []


def test_copy_on_write_counts_in_requirement():
    m = KVCacheManager(num_blocks=3, block_size=4)
    prefill(m, "p", [1, 2, 3, 4, 5, 6])
    m.fork("p", "c")
    before = snapshot(m)
    assert m.allocate_slots("c", [1, 2, 3, 4, 5, 6, 7], 6, 1) is None
    assert snapshot(m) == before


def test_swap_round_trip():
    m = KVCacheManager(num_blocks=8, block_size=4, num_host_blocks=4)
    tokens = list(range(10))
    blocks, _, _ = prefill(m, "a", tokens)
    prefill(m, "b", [50, 51])
    m.fork("b", "b2")  # shared blocks swap out fine
    assert m.can_swap_out("a") and not m.can_swap_out("nope")
    out = m.swap_out("a")
    assert [d for d, _ in out] == blocks and m.num_used_host_blocks == 3
    assert m.get_block_ids("a") == [] and m.num_free_blocks == 6
    assert not m.can_swap_out("a") and m.can_swap_in("a")
    assert m.swap_out("b") == [(blocks[-1] + 1, 3)]
    assert not m.can_swap_out("b2")  # host pool full
    back = m.swap_in("a")
    assert [h for h, _ in back] == [h for _, h in out] and m.num_used_host_blocks == 1
    assert m.get_block_ids("a") == [d for _, d in back] and len(back) == 3
    # Decoding continues; the restored full blocks are registered again.
    tokens.append(10)
    assert m.allocate_slots("a", tokens, 10, 1) == m.get_block_ids("a")
    assert m.get_computed_blocks("z", tokens + [11])[1] == 8
    m.free("b")
    m.free("b2")
    m.free("a")
    assert m.num_used_host_blocks == 0 and m.num_free_blocks == 7


def test_swap_out_before_pending_copy_reads_the_source():
    m = KVCacheManager(num_blocks=10, block_size=4, num_host_blocks=4)
    blocks, _, _ = prefill(m, "p", [1, 2, 3, 4, 5, 6])
    m.fork("p", "c")
    cb = m.allocate_slots("c", [1, 2, 3, 4, 5, 6, 8], 6, 1)
    out = m.swap_out("c")
    assert out == [(blocks[0], 0), (blocks[1], 1)]  # the copy never ran: read its source
    assert m.take_pending_copies() == [] and m.pool.blocks[cb[1]].ref_cnt == 0


def test_free_everything_and_reset():
    m = KVCacheManager(num_blocks=12, block_size=3, num_host_blocks=3)
    prefill(m, "a", list(range(8)))
    prefill(m, "b", list(range(7)))
    m.fork("a", "a2")
    m.allocate_slots("a2", list(range(8)) + [5], 8, 1)
    m.swap_out("b")
    assert not m.reset_prefix_cache()
    m.free("never-allocated")
    for rid in ("a", "a2", "b"):
        m.free(rid)
    m.free("a")  # already freed: nothing left to return
    assert m.num_free_blocks == 11 and m.usage == 0 and m.num_used_host_blocks == 0
    assert all(b.ref_cnt == 0 for b in m.pool.blocks)
    assert m.get_computed_blocks("c", list(range(8)))[1] == 6
    assert m.reset_prefix_cache()
    assert m.get_computed_blocks("c", list(range(8)))[1] == 0


# -------------------------------------------------------------- state machine
BS = 3
NUM_BLOCKS = 14
NUM_HOST = 6
MAX_LEN = 20
PREFIXES = [[0, 1, 0, 1, 1, 0], [1, 1, 1], []]
SALTS = [None, "s"]


@dataclass(slots=True)
class Req:
    tokens: list[int]
    salt: str | None
    num_computed: int = 0
    state: str = "waiting"  # waiting | running | swapped


class KVCacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = KVCacheManager(NUM_BLOCKS, BS, enable_caching=True, num_host_blocks=NUM_HOST)
        self.reqs: dict[str, Req] = {}
        self.content: dict[int, list] = {}  # device block -> per-slot (salt, prefix)
        self.host_content: dict[int, list] = {}
        self.shadow: dict[bytes, tuple] = {}  # hash -> (salt, tokens it covers)
        self.next_id = 0

    # --- helpers
    def _ids(self, state):
        return sorted(r for r, q in self.reqs.items() if q.state == state)

    def _pick(self, data, state):
        return data.draw(st.sampled_from(self._ids(state)))

    def _write(self, rid, start, stop):
        q = self.reqs[rid]
        blocks = self.m.get_block_ids(rid)
        for p in range(start, stop):
            slots = self.content.setdefault(blocks[p // BS], [None] * BS)
            slots[p % BS] = (q.salt, tuple(q.tokens[: p + 1]))

    def _allocate(self, rid, num_computed, num_new, hit_ids=()):
        q = self.reqs[rid]
        before = snapshot(self.m)
        if any(self.m.pool.blocks[b].ref_cnt == 0 for b in hit_ids):
            event("prefix hit on a freed block")
        out = self.m.allocate_slots(rid, q.tokens, num_computed, num_new, hit_ids, q.salt)
        if out is None:
            assert snapshot(self.m) == before
            event("allocation refused")
            return False
        if hit_ids:
            event("prefix hit")
        assert NULL_BLOCK_ID not in out and len(set(out)) == len(out)
        for src, dst in self.m.take_pending_copies():
            event("copy on write")
            self.content[dst] = list(self.content.get(src, [None] * BS))
        self._write(rid, num_computed, num_computed + num_new)
        q.num_computed = num_computed + num_new
        q.state = "running"
        return True

    def _maybe_sample(self, data, rid):
        q = self.reqs[rid]
        if q.num_computed == len(q.tokens) and len(q.tokens) < MAX_LEN:
            q.tokens.append(data.draw(st.integers(0, 1), label="sampled"))

    # --- rules
    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 1), max_size=8),
        salt=st.sampled_from(SALTS),
    )
    def add_request(self, prefix, suffix, salt):
        tokens = (prefix + suffix)[:MAX_LEN] or [0]
        self.reqs[f"r{self.next_id}"] = Req(tokens, salt)
        self.next_id += 1

    @precondition(lambda self: self._ids("waiting"))
    @rule(data=st.data())
    def schedule_waiting(self, data):
        rid = self._pick(data, "waiting")
        q = self.reqs[rid]
        ids, n = self.m.get_computed_blocks(rid, q.tokens, q.salt)
        assert n == len(ids) * BS and n < len(q.tokens)
        for i, bid in enumerate(ids):
            block = self.m.pool.blocks[bid]
            assert self.shadow[block.block_hash] == (q.salt, tuple(q.tokens[: (i + 1) * BS]))
            for k in range(BS):
                p = i * BS + k
                assert self.content[bid][k] == (q.salt, tuple(q.tokens[: p + 1]))
        num_new = data.draw(st.integers(1, len(q.tokens) - n), label="chunk")
        if self._allocate(rid, n, num_new, ids):
            self._maybe_sample(data, rid)

    @precondition(lambda self: self._ids("running"))
    @rule(data=st.data())
    def step_running(self, data):
        rid = self._pick(data, "running")
        q = self.reqs[rid]
        if q.num_computed == len(q.tokens):  # hit MAX_LEN: finish
            self.m.free(rid)
            del self.reqs[rid]
            return
        num_new = data.draw(st.integers(1, len(q.tokens) - q.num_computed), label="chunk")
        if self._allocate(rid, q.num_computed, num_new):
            self._maybe_sample(data, rid)

    @precondition(lambda self: any(
        q.state == "running" and q.num_computed == len(q.tokens) - 1 for q in self.reqs.values()
    ))
    @rule(data=st.data(), token=st.integers(0, 1))
    def fork(self, data, token):
        rid = data.draw(st.sampled_from([
            r for r in self._ids("running")
            if self.reqs[r].num_computed == len(self.reqs[r].tokens) - 1
        ]))
        q = self.reqs[rid]
        child = f"r{self.next_id}"
        self.next_id += 1
        self.m.fork(rid, child)
        self.reqs[child] = Req(q.tokens[:-1] + [token], q.salt, q.num_computed, "running")

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        self.m.free(rid)
        del self.reqs[rid]

    @precondition(lambda self: self._ids("running"))
    @rule(data=st.data())
    def preempt_recompute(self, data):
        rid = self._pick(data, "running")
        self.m.free(rid)
        q = self.reqs[rid]
        q.num_computed, q.state = 0, "waiting"

    @precondition(lambda self: self._ids("running"))
    @rule(data=st.data())
    def swap_out(self, data):
        rid = self._pick(data, "running")
        if not self.m.can_swap_out(rid):
            return
        for dev, host in self.m.swap_out(rid):
            self.host_content[host] = list(self.content[dev])
        self.reqs[rid].state = "swapped"
        event("swap out")

    @precondition(lambda self: self._ids("swapped"))
    @rule(data=st.data())
    def swap_in(self, data):
        rid = self._pick(data, "swapped")
        if not self.m.can_swap_in(rid):
            return
        for host, dev in self.m.swap_in(rid):
            self.content[dev] = list(self.host_content[host])
        self.reqs[rid].state = "running"
        event("swap in")

    @rule()
    def reset_prefix_cache(self):
        idle = self.m.num_free_blocks == NUM_BLOCKS - 1
        assert self.m.reset_prefix_cache() == idle
        if idle:
            assert not self.m.pool.cached_block_hash_to_block

    # --- invariants
    @invariant()
    def pool_is_partitioned(self):
        pool = self.m.pool
        free = list(pool.free_block_queue)
        free_ids = [b.block_id for b in free]
        assert len(free_ids) == len(set(free_ids)) == pool.get_num_free_blocks()
        for prev, nxt in zip(free, free[1:]):
            assert prev.next_free is nxt and nxt.prev_free is prev
        holders = Counter(b.block_id for bs in self.m.req_to_blocks.values() for b in bs)
        assert pool.null_block.ref_cnt == 0 and NULL_BLOCK_ID not in holders
        assert NULL_BLOCK_ID not in free_ids and not pool.free_block_queue.contains(pool.null_block)
        for block in pool.blocks[1:]:
            assert block.ref_cnt >= 0
            assert block.ref_cnt == holders[block.block_id]
            assert (block.ref_cnt == 0) == (block.block_id in set(free_ids))
        assert self.m.usage == pytest.approx(1 - len(free_ids) / (NUM_BLOCKS - 1))
        # The dashboard's mirrors agree with the block records.
        assert pool.ref_counts.tolist() == [b.ref_cnt for b in pool.blocks]
        assert pool.hashed.tolist() == [b.block_hash is not None for b in pool.blocks]
        assert pool.get_num_cached_free_blocks() == sum(b.block_hash is not None for b in free)

    @invariant()
    def hashes_are_consistent(self):
        pool = self.m.pool
        for h, block in pool.cached_block_hash_to_block.items():
            assert block.block_hash == h
        hashed = [b for b in pool.blocks if b.block_hash is not None]
        assert len(hashed) == len(pool.cached_block_hash_to_block)
        # Record the true meaning of every hash a live request can produce.
        for q in self.reqs.values():
            parent = None
            for i in range(len(q.tokens) // BS):
                parent = hash_block_tokens(parent, q.tokens[i * BS : (i + 1) * BS], q.salt if i == 0 else None)
                meaning = (q.salt, tuple(q.tokens[: (i + 1) * BS]))
                assert self.shadow.setdefault(parent, meaning) == meaning
        for block in hashed:
            salt, prefix = self.shadow[block.block_hash]
            i = len(prefix) // BS - 1
            for k in range(BS):
                assert self.content[block.block_id][k] == (salt, prefix[: i * BS + k + 1])

    @invariant()
    def requests_see_their_own_kv(self):
        assert 0 <= self.m.prefix_cache_hits <= self.m.prefix_cache_queries
        host_used = 0
        for rid, q in self.reqs.items():
            if q.state == "waiting":
                assert self.m.get_block_ids(rid) == [] and rid not in self.m.req_to_host_blocks
                continue
            if q.state == "running":
                blocks, store = self.m.get_block_ids(rid), self.content
                assert rid not in self.m.req_to_host_blocks
            else:
                blocks, store = self.m.req_to_host_blocks[rid], self.host_content
                assert self.m.get_block_ids(rid) == []
                host_used += len(blocks)
            assert len(blocks) == -(-q.num_computed // BS)
            for p in range(q.num_computed):
                assert store[blocks[p // BS]][p % BS] == (q.salt, tuple(q.tokens[: p + 1]))
        assert self.m.num_used_host_blocks == host_used

    def teardown(self):
        for rid in list(self.reqs):
            self.m.free(rid)
        self.reqs.clear()
        self.pool_is_partitioned()
        assert self.m.num_free_blocks == NUM_BLOCKS - 1 and self.m.usage == 0
        assert self.m.num_used_host_blocks == 0
        assert not self.m.req_to_blocks and not self.m._req_to_hashes
        assert not self.m._num_cached_blocks


KVCacheMachine.TestCase.settings = settings(
    max_examples=600,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVCacheMachine = KVCacheMachine.TestCase

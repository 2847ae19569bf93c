"""Unit tests for BlockPool, its LRU free queue and the block hash."""

import pytest

from jpaged.cache import NULL_BLOCK_ID, BlockPool, hash_block_tokens


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_block_queue]


def test_null_block_never_handed_out():
    pool = BlockPool(5, enable_caching=True)
    assert pool.get_num_free_blocks() == 4
    blocks = pool.get_new_blocks(4)
    assert NULL_BLOCK_ID not in [b.block_id for b in blocks]
    assert pool.usage == 1.0
    with pytest.raises(AssertionError):
        pool.get_new_blocks(1)
    with pytest.raises(AssertionError):
        pool.free_blocks([pool.null_block])
    with pytest.raises(AssertionError):
        pool.touch([pool.null_block])


def test_too_small_pool_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1, enable_caching=True)


def test_lru_order_and_hash_kept_until_reuse():
    pool = BlockPool(5, enable_caching=True)
    a, b, c, d = pool.get_new_blocks(4)
    assert pool.usage == 1.0
    h = hash_block_tokens(None, [1, 2])
    assert pool.cache_full_block(b, h)
    pool.free_blocks([c, b])  # c first: evicted first
    pool.free_blocks([a])
    assert free_ids(pool) == [c.block_id, b.block_id, a.block_id]
    assert pool.usage == 0.25
    # A freed block stays findable until popped for reuse.
    assert pool.get_cached_block(h) is b and b.block_hash == h
    (x,) = pool.get_new_blocks(1)
    assert x is c
    assert pool.get_cached_block(h) is b
    (y,) = pool.get_new_blocks(1)
    assert y is b and b.block_hash is None and pool.get_cached_block(h) is None


def test_touch_revives_from_middle_of_queue():
    pool = BlockPool(5, enable_caching=True)
    blocks = pool.get_new_blocks(4)
    pool.free_blocks(blocks)
    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 1
    assert free_ids(pool) == [blocks[0].block_id, blocks[2].block_id, blocks[3].block_id]
    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 2
    pool.free_blocks([blocks[1]])
    assert blocks[1].ref_cnt == 1 and pool.get_num_free_blocks() == 3


def test_double_free_rejected_before_mutation():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks([a, b, a])
    assert a.ref_cnt == 1 and b.ref_cnt == 1 and pool.get_num_free_blocks() == 1
    pool.free_blocks([a])
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks([a])
    assert a.ref_cnt == 0


def test_duplicate_hash_first_block_wins():
    pool = BlockPool(4, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [7])
    assert pool.cache_full_block(a, h)
    assert not pool.cache_full_block(b, h)
    assert b.block_hash is None and pool.get_cached_block(h) is a


def test_caching_disabled():
    pool = BlockPool(4, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    assert not pool.cache_full_block(a, h)
    assert pool.get_cached_block(h) is None


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(4, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1])
    pool.cache_full_block(a, h)
    assert not pool.reset_prefix_cache()
    pool.free_blocks([a])
    assert pool.get_cached_block(h) is a
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(h) is None and a.block_hash is None


def test_hash_is_chained_salted_and_stable():
    h0 = hash_block_tokens(None, [1, 2, 3])
    assert h0 == hash_block_tokens(None, (1, 2, 3)) and len(h0) == 32
    assert h0 != hash_block_tokens(None, [1, 2, 4])
    assert h0 != hash_block_tokens(None, [1, 2, 3], "salt")
    assert hash_block_tokens(None, [1], "a") != hash_block_tokens(None, [1], "b")
    assert hash_block_tokens(h0, [4]) != hash_block_tokens(None, [4])
    # Field boundaries are unambiguous.
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [1, 2], "")
    # Pinned digest: the encoding must not change silently (it is a cache key).
    assert hash_block_tokens(None, [0, 1]).hex() == PINNED_DIGEST


PINNED_DIGEST = "f5edcbda30a002ff6722bf2d33733d939c36d4f235639a3157a3f4e7d8397466"

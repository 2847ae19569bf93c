"""Physical KV blocks, their LRU free queue and the prefix-hash map.

Lifecycle of a block: (1) it starts in the free queue with ``ref_cnt`` 0;
(2) ``get_new_blocks`` pops it from the head, evicts its old hash from the
prefix map and sets ``ref_cnt`` to 1; (3) once full, the manager registers it
under the chained hash of its tokens (``cache_full_block``); (4) other
requests share it through a prefix hit or a fork (``touch``: ref++);
(5) ``free_blocks`` drops ref counts and appends blocks that reach 0 to the
tail of the free queue, where they keep their hash and can be revived by a
later prefix hit until they drift to the head and are reused. Block 0 is the
null block that pads block tables: it is never handed out nor freed. For the
live dashboard the pool also keeps numpy mirrors of every block's ref count
and hashed flag, written where those change (never scanned per step), and the
free queue counts its hashed blocks. No JAX; tested in
``tests/test_block_pool.py`` and by the state machine in
``tests/test_kv_cache_manager.py``.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

NULL_BLOCK_ID = 0

# Bump when the byte encoding below changes, so stale hashes never collide.
_HASH_DOMAIN = b"jpaged.kv_block.v1"


def hash_block_tokens(
    parent_hash: bytes | None,
    token_ids: Sequence[int],
    extra: str | None = None,
) -> bytes:
    """SHA-256 of one full block, chained on the hash of the block before it.

    Every field is length-prefixed little-endian bytes (never pickle), so the
    digest is stable across processes, platforms and Python versions.

    Args:
      parent_hash: hash of the previous block of the request, None for the first.
      token_ids: the block's token ids (int64 range).
      extra: cache salt; only the first block of a request carries it, the
        chain propagates it to every later block.

    Returns:
      The 32-byte digest.
    """
    h = hashlib.sha256(_HASH_DOMAIN)
    if parent_hash is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01" + struct.pack("<I", len(parent_hash)) + parent_hash)
    n = len(token_ids)
    h.update(struct.pack(f"<Q{n}q", n, *token_ids))
    if extra is None:
        h.update(b"\x00")
    else:
        salt = extra.encode("utf-8")
        h.update(b"\x01" + struct.pack("<I", len(salt)) + salt)
    return h.digest()


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """Host record of one physical KV block (identity equality, no deep repr)."""

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeKVCacheBlockQueue:
    """Doubly linked LRU list of free blocks: pop from the head, append at the tail.

    Sentinel head and tail nodes make ``remove`` O(1) from anywhere, which a
    prefix hit on a freed block needs. A block is in the queue iff its
    ``prev_free`` link is set. ``num_hashed`` counts the queued blocks that
    keep a prefix hash (revivable by a prefix hit); a block's hash only
    changes while it is out of the queue, except in ``BlockPool.reset_prefix_cache``.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        self.num_hashed = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVCacheBlock]:
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    @staticmethod
    def contains(block: KVCacheBlock) -> bool:
        return block.prev_free is not None

    def append(self, block: KVCacheBlock) -> None:
        assert not self.contains(block), f"block {block.block_id} already free"
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._len += 1
        self.num_hashed += block.block_hash is not None

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} not free"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1
        self.num_hashed -= block.block_hash is not None

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        assert block is not None and block is not self._tail, "free queue is empty"
        self.remove(block)
        return block


class BlockPool:
    """All physical blocks of the device KV cache, with ref counts and prefix map.

    Args:
      num_blocks: total blocks including the null block 0 (at least 2).
      enable_caching: keep full blocks findable by hash (prefix caching).
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks[1:])
        self.cached_block_hash_to_block: dict[bytes, KVCacheBlock] = {}
        # Mirrors for whole-pool views (jpaged.engine.engine_state): numpy
        # reads them in microseconds where a walk over the blocks would not.
        self.ref_counts = np.zeros(num_blocks, np.int32)
        self.hashed = np.zeros(num_blocks, bool)

    def get_num_free_blocks(self) -> int:
        return len(self.free_block_queue)

    def get_num_cached_free_blocks(self) -> int:
        """Free blocks that keep their prefix hash: reused by a hit until evicted."""
        return self.free_block_queue.num_hashed

    def _mirror_refs(self, blocks: Sequence[KVCacheBlock]) -> None:
        refs = self.ref_counts
        if len(blocks) <= 8:  # the usual case (a block or two a step): item writes
            for b in blocks:
                refs[b.block_id] = b.ref_cnt
        else:
            refs[[b.block_id for b in blocks]] = [b.ref_cnt for b in blocks]

    @property
    def usage(self) -> float:
        """Fraction of the non-null blocks held by at least one request."""
        usable = self.num_blocks - 1
        return (usable - self.get_num_free_blocks()) / usable

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pops ``num_blocks`` least recently freed blocks, evicting their hashes."""
        assert 0 <= num_blocks <= self.get_num_free_blocks(), (
            f"asked for {num_blocks} blocks, {self.get_num_free_blocks()} free"
        )
        out = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            assert block.ref_cnt == 0 and block is not self.null_block
            self._evict_hash(block)
            block.ref_cnt = 1
            out.append(block)
        self._mirror_refs(out)
        return out

    def _evict_hash(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        assert self.cached_block_hash_to_block.get(block.block_hash) is block
        del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None
        self.hashed[block.block_id] = False

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Adds one reference to each block, reviving free ones from the queue."""
        for block in blocks:
            assert block is not self.null_block, "the null block is never handed out"
            assert block.ref_cnt > 0 or self.free_block_queue.contains(block)
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1
        self._mirror_refs(blocks)

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference per block; blocks reaching 0 go to the queue tail.

        Callers pass blocks in eviction order (a request's tail blocks first)
        so that shared prefix heads stay cached longest.
        """
        blocks = list(blocks)
        counts = Counter(id(b) for b in blocks)
        for block in blocks:
            assert block is not self.null_block, "the null block is never freed"
            assert block.ref_cnt >= counts[id(block)], f"double free of block {block.block_id}"
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)
        self._mirror_refs(blocks)

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        if not self.enable_caching:
            return None
        return self.cached_block_hash_to_block.get(block_hash)

    def cache_full_block(self, block: KVCacheBlock, block_hash: bytes) -> bool:
        """Registers a full, held block under ``block_hash``.

        Returns:
          True if registered; False if caching is off or another block already
          holds this hash (the first one wins and this block stays unhashed).
        """
        assert block is not self.null_block and block.ref_cnt > 0
        assert block.block_hash is None, f"block {block.block_id} already hashed"
        if not self.enable_caching or block_hash in self.cached_block_hash_to_block:
            return False
        self.cached_block_hash_to_block[block_hash] = block
        block.block_hash = block_hash
        self.hashed[block.block_id] = True
        return True

    def reset_prefix_cache(self) -> bool:
        """Forgets every hash; refused (False) while any block is in use."""
        if self.get_num_free_blocks() != self.num_blocks - 1:
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.block_hash = None
        self.hashed[:] = False
        self.free_block_queue.num_hashed = 0
        return True

"""Per-request KV block allocation on top of ``BlockPool``, keyed by request id.

Lifecycle of a request's blocks: (1) while it waits, the scheduler asks
``get_computed_blocks`` for its longest cached prefix of full blocks (the
last prompt token is always recomputed); (2) ``allocate_slots`` takes those
blocks (ref++) plus fresh ones for the tokens scheduled this step, or returns
None and changes nothing; every block that becomes full is hashed (SHA-256
chain, the cache salt in the first block) and registered for later hits;
(3) each decode step calls ``allocate_slots`` again, which grows the block
list across block boundaries and copies-on-write a partially filled last
block shared through ``fork`` (the model runner applies
``take_pending_copies`` before the forward); (4) preemption either frees the
blocks (recompute) or moves them to host memory (``swap_out``/``swap_in``);
(5) ``free`` returns the blocks tail first, so shared prefix heads are
evicted last. Device work implied by one step must run in this order:
swap-out copies, pending copy-on-write copies, then swap-in copies; and the
scheduler must not swap in during a step that swapped out (as in vLLM), since
a freed host block could be reused in the same step. Tested by unit tests and a
hypothesis state machine in ``tests/test_kv_cache_manager.py``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from jpaged.cache.block_pool import BlockPool, KVCacheBlock, hash_block_tokens


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns block ids, prefix hashes and host swap slots for every request.

    Args:
      num_blocks: device blocks including the null block 0.
      block_size: tokens per block.
      enable_caching: automatic prefix caching.
      num_host_blocks: host (CPU) blocks available for swap preemption.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        num_host_blocks: int = 0,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Memo of the chained hashes of a request's full blocks (a pure
        # function of its tokens and salt), and how many of its blocks have
        # been offered to the prefix map already.
        self._req_to_hashes: dict[str, list[bytes]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.num_host_blocks = num_host_blocks
        self._free_host_blocks: deque[int] = deque(range(num_host_blocks))
        self.req_to_host_blocks: dict[str, list[int]] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ----------------------------------------------------------------- stats
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_used_host_blocks(self) -> int:
        return self.num_host_blocks - len(self._free_host_blocks)

    def num_blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def can_fit_ever(self, num_tokens: int) -> bool:
        """Whether ``num_tokens`` tokens fit in the whole pool (minus the null block)."""
        return self.num_blocks_needed(num_tokens) <= self.num_blocks - 1

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        """Clears every hash; refused (False) while any block is in use."""
        return self.pool.reset_prefix_cache()

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Returns and clears the ``(src_block_id, dst_block_id)`` copy-on-write list."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    # --------------------------------------------------------------- hashing
    def _block_hashes(
        self, request_id: str, token_ids: Sequence[int], cache_salt: str | None, num_full: int
    ) -> list[bytes]:
        """Extends the request's hash memo to its first ``num_full`` full blocks."""
        bs = self.block_size
        assert num_full * bs <= len(token_ids)
        hashes = self._req_to_hashes.setdefault(request_id, [])
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            extra = cache_salt if i == 0 else None
            hashes.append(hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs], extra))
        return hashes

    def get_computed_blocks(
        self, request_id: str, token_ids: Sequence[int], cache_salt: str | None = None
    ) -> tuple[list[int], int]:
        """Finds the longest cached prefix of full blocks; mutates no ref count.

        Args:
          request_id: the (waiting) request.
          token_ids: all its known tokens.
          cache_salt: separates caches of different tenants.

        Returns:
          (block ids, num_cached_tokens); at least the last token is left to
          recompute, so the forward has a position to sample from.
        """
        if not self.enable_caching:
            return [], 0
        max_blocks = max(0, (len(token_ids) - 1) // self.block_size)
        hashes = self._block_hashes(request_id, token_ids, cache_salt, max_blocks)
        block_ids = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            block_ids.append(block.block_id)
        num_cached_tokens = len(block_ids) * self.block_size
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += num_cached_tokens
        return block_ids, num_cached_tokens

    # ------------------------------------------------------------ allocation
    def allocate_slots(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed_block_ids: Sequence[int] = (),
        cache_salt: str | None = None,
    ) -> list[int] | None:
        """Makes room for ``num_new_tokens`` more tokens of the request; returns
        its full block-id list or None. See `allocate_slots_delta`."""
        changed = self.allocate_slots_delta(request_id, token_ids, num_computed_tokens,
                                            num_new_tokens, new_computed_block_ids, cache_salt)
        return None if changed is None else self.get_block_ids(request_id)

    def allocate_slots_delta(
        self,
        request_id: str,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        num_new_tokens: int,
        new_computed_block_ids: Sequence[int] = (),
        cache_salt: str | None = None,
    ) -> tuple[int, list[int]] | None:
        """Makes room for ``num_new_tokens`` more tokens of the request.

        Args:
          request_id: the request.
          token_ids: all its known tokens (prompt + generated so far).
          num_computed_tokens: tokens already in the cache, including those of
            ``new_computed_block_ids``.
          num_new_tokens: tokens to write this step.
          new_computed_block_ids: prefix-hit blocks from
            ``get_computed_blocks``, only on the first allocation.
          cache_salt: the same salt given to ``get_computed_blocks``.

        Returns:
          ``(offset, block_ids)``: the request's block list changed from index
          ``offset`` on, and these are its entries from there (blocks copied on
          write and new ones; usually none for a decode step, never the whole
          list, so a step costs the same at any length). None (nothing
          changed) if the free blocks, counting revived prefix hits and
          copy-on-write, fall short.
        """
        bs = self.block_size
        blocks = self.req_to_blocks.get(request_id, [])
        if num_new_tokens == 1 and blocks and not new_computed_block_ids:
            # Decode fast path: the token lands in a block the request owns
            # alone, and no block becomes full and hashable.
            j = num_computed_tokens // bs
            if (j < len(blocks) and blocks[j].ref_cnt == 1 and (
                    not self.enable_caching
                    or min(num_computed_tokens + 1, len(token_ids)) // bs
                    <= self._num_cached_blocks.get(request_id, 0))):
                return len(blocks), []
        assert num_computed_tokens >= 0 and num_new_tokens >= 0
        assert request_id not in self.req_to_host_blocks, f"{request_id} is swapped out"
        computed = [self.pool.blocks[i] for i in new_computed_block_ids]
        assert not (computed and blocks), "prefix-hit blocks only on the first allocation"
        assert len(computed) * bs <= num_computed_tokens
        if computed:
            hashes = self._block_hashes(request_id, token_ids, cache_salt, len(computed))
            for block, block_hash in zip(computed, hashes):
                assert block.block_hash == block_hash, (
                    f"block {block.block_id} evicted since get_computed_blocks"
                )

        num_required = cdiv(num_computed_tokens + num_new_tokens, bs)
        num_new_blocks = max(0, num_required - len(blocks) - len(computed))
        # Held blocks this step writes into that another request shares.
        cow = []
        if num_new_tokens > 0:
            first = num_computed_tokens // bs
            cow = [j for j in range(first, min(len(blocks), num_required)) if blocks[j].ref_cnt > 1]
        num_revived = sum(1 for b in computed if b.ref_cnt == 0)
        if num_revived + len(cow) + num_new_blocks > self.pool.get_num_free_blocks():
            return None

        # Touch the hits first so that get_new_blocks cannot evict them.
        self.pool.touch(computed)
        blocks = self.req_to_blocks.setdefault(request_id, blocks)
        # Entries that change: appended blocks and blocks copied on write.
        offset = min([len(blocks)] + cow) if blocks else 0
        if computed:
            blocks.extend(computed)
            self._num_cached_blocks[request_id] = len(computed)
        for j in cow:
            (fresh,) = self.pool.get_new_blocks(1)
            shared, blocks[j] = blocks[j], fresh
            self.pool.free_blocks([shared])
            if j * bs < num_computed_tokens:
                self._pending_copies.append((shared.block_id, fresh.block_id))
        blocks.extend(self.pool.get_new_blocks(num_new_blocks))

        if self.enable_caching:
            num_full = min(num_computed_tokens + num_new_tokens, len(token_ids)) // bs
            self._cache_full_blocks(request_id, token_ids, cache_salt, num_full)
        return offset, [b.block_id for b in blocks[offset:]]

    def _cache_full_blocks(
        self, request_id: str, token_ids: Sequence[int], cache_salt: str | None, num_full: int
    ) -> None:
        start = self._num_cached_blocks.get(request_id, 0)
        if num_full <= start:
            return
        blocks = self.req_to_blocks[request_id]
        hashes = self._block_hashes(request_id, token_ids, cache_salt, num_full)
        for j in range(start, num_full):
            if blocks[j].block_hash is None:
                self.pool.cache_full_block(blocks[j], hashes[j])
            else:  # shared through a fork or a prefix hit
                assert blocks[j].block_hash == hashes[j], f"hash mismatch in block {blocks[j].block_id}"
        self._num_cached_blocks[request_id] = num_full

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares all the parent's blocks; writes copy on write."""
        assert parent_id in self.req_to_blocks, f"unknown parent {parent_id}"
        assert child_id not in self.req_to_blocks and child_id not in self.req_to_host_blocks
        blocks = self.req_to_blocks[parent_id]
        self.pool.touch(blocks)
        self.req_to_blocks[child_id] = list(blocks)
        if parent_id in self._req_to_hashes:
            self._req_to_hashes[child_id] = list(self._req_to_hashes[parent_id])
        self._num_cached_blocks[child_id] = self._num_cached_blocks.get(parent_id, 0)

    def free(self, request_id: str) -> None:
        """Returns all the request's device and host blocks; no-op if it holds none."""
        blocks = self.req_to_blocks.pop(request_id, None)
        if blocks:
            dropped = {b.block_id for b in blocks if b.ref_cnt == 1}
            # A pending copy into a block that is going back to the pool is moot.
            self._pending_copies = [c for c in self._pending_copies if c[1] not in dropped]
            self.pool.free_blocks(reversed(blocks))
        host = self.req_to_host_blocks.pop(request_id, None)
        if host:
            self._free_host_blocks.extend(host)
        self._req_to_hashes.pop(request_id, None)
        self._num_cached_blocks.pop(request_id, None)

    # -------------------------------------------------------------- swapping
    def can_swap_out(self, request_id: str) -> bool:
        blocks = self.req_to_blocks.get(request_id)
        return bool(blocks) and len(blocks) <= len(self._free_host_blocks)

    def swap_out(self, request_id: str) -> list[tuple[int, int]]:
        """Moves the request to host blocks and frees its device blocks.

        Returns:
          ``(device_block_id, host_block_id)`` pairs to copy before the step.
        """
        assert self.can_swap_out(request_id), f"cannot swap out {request_id}"
        blocks = self.req_to_blocks.pop(request_id)
        # A copy-on-write block not copied yet still has its data in the source.
        pending = {dst: src for src, dst in self._pending_copies}
        host = [self._free_host_blocks.popleft() for _ in blocks]
        mapping = [(pending.get(b.block_id, b.block_id), h) for b, h in zip(blocks, host)]
        dropped = {b.block_id for b in blocks if b.ref_cnt == 1}
        self._pending_copies = [c for c in self._pending_copies if c[1] not in dropped]
        self.pool.free_blocks(reversed(blocks))
        self.req_to_host_blocks[request_id] = host
        # Swapped-in copies come back unhashed and get registered again.
        self._num_cached_blocks[request_id] = 0
        return mapping

    def can_swap_in(self, request_id: str) -> bool:
        host = self.req_to_host_blocks.get(request_id)
        return host is not None and len(host) <= self.pool.get_num_free_blocks()

    def swap_in(self, request_id: str) -> list[tuple[int, int]]:
        """Moves the request back to fresh device blocks and frees its host blocks.

        Returns:
          ``(host_block_id, device_block_id)`` pairs to copy before the step.
        """
        assert self.can_swap_in(request_id), f"cannot swap in {request_id}"
        host = self.req_to_host_blocks.pop(request_id)
        blocks = self.pool.get_new_blocks(len(host))
        self.req_to_blocks[request_id] = blocks
        self._free_host_blocks.extend(host)
        self._num_cached_blocks[request_id] = 0
        return [(h, b.block_id) for h, b in zip(host, blocks)]

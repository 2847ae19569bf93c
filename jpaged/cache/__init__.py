"""Host-side KV block management: the block pool and the per-request manager."""

from jpaged.cache.block_pool import NULL_BLOCK_ID, BlockPool, KVCacheBlock, hash_block_tokens
from jpaged.cache.kv_cache_manager import KVCacheManager

__all__ = ["NULL_BLOCK_ID", "BlockPool", "KVCacheBlock", "KVCacheManager", "hash_block_tokens"]

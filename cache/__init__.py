"""KV cache substrate: schema, block allocator, paged pools, per-request state, handles, manager."""

from .allocator import BlockAllocator
from .handles import LayerHandle
from .manager import CacheManager
from .pools import EntryStore
from .schema import BLOCK_TOKENS, CacheError, CacheSchema, EntryFormat, LayerSchema, v32_bytes

__all__ = ["BLOCK_TOKENS", "BlockAllocator", "CacheError", "CacheManager", "CacheSchema", "EntryFormat",
           "EntryStore", "LayerHandle", "LayerSchema", "v32_bytes"]

"""Fixed-size block free list."""

from __future__ import annotations

from .schema import CacheError


class BlockAllocator:
    """Hands out block ids 0..num_blocks-1; never reuses a block that is still held."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() yields the lowest id first
        self._held: set[int] = set()

    @property
    def free_count(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise CacheError(f"KV cache block pool exhausted ({self.num_blocks} blocks all in use)")
        b = self._free.pop()
        self._held.add(b)
        return b

    def release(self, block: int) -> None:
        if block not in self._held:
            raise CacheError(f"block {block} released twice or never acquired")
        self._held.remove(block)
        self._free.append(block)

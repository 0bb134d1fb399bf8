"""Which KV-cache blocks each sequence holds: a free list and block tables. No torch."""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether the table can grow to hold `num_tokens` tokens in all."""
        return self.num_blocks_for(num_tokens) - len(block_table) <= len(self.free_blocks)

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Grow `block_table` in place to hold `num_tokens` tokens; only the blocks it needs."""
        missing = self.num_blocks_for(num_tokens) - len(block_table)
        if missing > len(self.free_blocks):
            raise RuntimeError("out of KV blocks: check can_allocate first")
        for _ in range(missing):
            block_table.append(self.free_blocks.popleft())

    def free(self, block_table: list[int]) -> None:
        """Return every block of the table to the free list and empty the table."""
        # Recently used blocks go to the front: they are likelier to be warm in cache.
        self.free_blocks.extendleft(reversed(block_table))
        block_table.clear()

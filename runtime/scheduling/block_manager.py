"""Which KV-cache blocks each sequence holds: a free list, block tables, shared blocks. No torch.

Blocks are reference counted so that the n choices of one request share their prompt's KV
(copy-on-write): `fork` gives a new table the same full blocks (refcount + 1) and a fresh
copy of the partial last block, the only one either side will write next. A block goes back
to the free list when its last holder frees it.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

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
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            block_table.append(block)

    def free(self, block_table: list[int]) -> None:
        """Drop the table's hold on each of its blocks and empty the table; a block nobody
        holds any more returns to the free list."""
        released = []
        for block in block_table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                released.append(block)
        # Recently used blocks go to the front: they are likelier to be warm in cache.
        self.free_blocks.extendleft(reversed(released))
        block_table.clear()

    def can_fork(self, num_tokens: int) -> bool:
        return num_tokens % self.block_size == 0 or bool(self.free_blocks)

    def fork(
        self, block_table: list[int], num_tokens: int
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """A table for a copy of a sequence whose first `num_tokens` tokens are cached in
        `block_table`: (new table, [(src block, dst block)] whose KV the caller must copy)."""
        full = num_tokens // self.block_size
        table = block_table[:full]
        for block in table:
            self.ref_counts[block] += 1
        copies: list[tuple[int, int]] = []
        if num_tokens % self.block_size:
            if not self.free_blocks:
                raise RuntimeError("out of KV blocks: check can_fork first")
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            copies.append((block_table[full], block))
            table.append(block)
        return table, copies

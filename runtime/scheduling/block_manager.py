"""Which KV-cache blocks each sequence holds: a free list, block tables, shared blocks, and
the prefix cache over them. No torch.

Blocks are reference counted so that the n choices of one request share their prompt's KV
(copy-on-write): `fork` gives a new table the same full blocks (refcount + 1) and a fresh
copy of the partial last block, the only one either side will write next.

Prefix cache: a full block whose K/V are computed is `register`ed under its hash (the chain
of `prefix_hashes.py`: tenant, adapter version and every token up to the block's end), so a
later sequence whose first blocks hash the same takes them (`lookup`, then `acquire`) instead
of prefilling them. A block nobody holds any more keeps its K/V and its hash: it waits among
the evictable blocks and is reused by whichever comes first, a sequence whose prefix hits it
or an allocation that finds the free list empty. A block never registered goes back to the
free list, which allocation prefers.

Eviction is fair between tenants: it takes the least recently freed block of the tenant that
has the most evictable blocks (ties: the least recently freed of theirs). Under one tenant
that is plain LRU. Under a global LRU, a tenant that streamed unique prompts would push every
other tenant's cached prefixes out (their first tokens slowed by a stranger's traffic); here
it evicts its own once it holds more of the cache than anyone, so each tenant keeps at least
an equal share of the evictable blocks whatever the others send. The choice scans the
tenants that have evictable blocks, once per evicted block.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))  # no holder, no cached K/V
        self.ref_counts = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> the block holding its K/V
        self.block_hashes: dict[int, bytes] = {}  # the inverse, for the blocks in `cached`
        self.block_tenants: dict[int, str] = {}  # who computed a cached block
        # Cached, unheld blocks: each with when it was freed (a tick), and per tenant in that
        # order, least recently freed first.
        self.evictable: dict[int, int] = {}
        self._evictable_of: dict[str, OrderedDict[int, None]] = {}
        self._tick = 0
        self.evictions: dict[str, int] = {}  # tenant -> cached blocks evicted

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones and evictable cached ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    @property
    def evictable_by_tenant(self) -> dict[str, int]:
        """tenant -> its evictable blocks: the shares eviction balances."""
        return {tenant: len(blocks) for tenant, blocks in self._evictable_of.items()}

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether the table can grow to hold `num_tokens` tokens in all."""
        return self.num_blocks_for(num_tokens) - len(block_table) <= self.num_free_blocks

    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a sequence that takes the cached blocks `hits` can then grow to
        `num_tokens` tokens: the hits that sit unheld (evictable) stop counting as free."""
        unheld = sum(1 for block in hits if self.ref_counts[block] == 0)
        return self.num_blocks_for(num_tokens) - len(hits) <= self.num_free_blocks - unheld

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Grow `block_table` in place to hold `num_tokens` tokens; only the blocks it needs."""
        missing = self.num_blocks_for(num_tokens) - len(block_table)
        if missing > self.num_free_blocks:
            raise RuntimeError("out of KV blocks: check can_allocate first")
        for _ in range(missing):
            block = self.free_blocks.popleft() if self.free_blocks else self._evict()
            self.ref_counts[block] = 1
            block_table.append(block)

    def _evict(self) -> int:
        """Take an evictable block for reuse: the fair choice of the module docstring."""
        tenant = max(self._evictable_of, key=lambda t: (
            len(self._evictable_of[t]), -self.evictable[next(iter(self._evictable_of[t]))]))
        block = next(iter(self._evictable_of[tenant]))
        self._unpark(block)
        self.evictions[tenant] = self.evictions.get(tenant, 0) + 1
        self._unregister(block)
        return block

    def _park(self, block: int) -> None:
        """A cached block nobody holds any more: evictable, most recently freed."""
        tenant = self.block_tenants.get(block, "")
        self.evictable[block] = self._tick
        self._evictable_of.setdefault(tenant, OrderedDict())[block] = None
        self._tick += 1

    def _unpark(self, block: int) -> None:
        """An evictable block held again, forgotten or evicted."""
        tenant = self.block_tenants.get(block, "")
        del self.evictable[block]
        mine = self._evictable_of[tenant]
        del mine[block]
        if not mine:
            del self._evictable_of[tenant]

    def free(self, block_table: list[int]) -> None:
        """Drop the table's hold on each of its blocks and empty the table. A block nobody
        holds any more returns to the free list, or, if registered, to the evictable blocks."""
        released = []
        # Last block first: of one sequence's cached blocks, its tail is the least likely to
        # be shared by a later prompt, so it is the first to go.
        for block in reversed(block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.block_hashes:
                    self._park(block)
                else:
                    released.append(block)
        # Recently used blocks go to the front: they are likelier to be warm in cache.
        self.free_blocks.extendleft(released)
        block_table.clear()

    # -- prefix cache -------------------------------------------------------------------

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the first. No side effect."""
        blocks = []
        for digest in hashes:
            block = self.cached.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def acquire(self, blocks: list[int]) -> None:
        """Hold each cached block of a `lookup` (refcount + 1; no longer evictable if unheld)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                self._unpark(block)
            self.ref_counts[block] += 1

    def register(self, block: int, digest: bytes, tenant: str) -> None:
        """Offer a held, full block whose K/V are computed to later prompts under `digest`.
        A digest already cached in another block keeps that one (n choices that sampled the
        same tokens fill two blocks alike; one entry is enough)."""
        if digest in self.cached or block in self.block_hashes:
            return
        self.cached[digest] = block
        self.block_hashes[block] = digest
        self.block_tenants[block] = tenant

    def forget(self, blocks: list[int]) -> None:
        """Withdraw `blocks` from the prefix cache: their K/V must not be reused (a sequence
        whose activations turned non-finite). Unheld ones go back to the free list."""
        for block in blocks:
            if block not in self.block_hashes:
                continue
            if self.ref_counts[block] == 0:
                self._unpark(block)  # while its tenant is still on record
                self.free_blocks.append(block)
            self._unregister(block)

    def _unregister(self, block: int) -> None:
        digest = self.block_hashes.pop(block)
        del self.cached[digest]
        self.block_tenants.pop(block, None)

    # -- n choices ----------------------------------------------------------------------

    def can_fork(self, num_tokens: int) -> bool:
        return num_tokens % self.block_size == 0 or self.num_free_blocks > 0

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
            if not self.num_free_blocks:
                raise RuntimeError("out of KV blocks: check can_fork first")
            block = self.free_blocks.popleft() if self.free_blocks else self._evict()
            self.ref_counts[block] = 1
            copies.append((block_table[full], block))
            table.append(block)
        return table, copies

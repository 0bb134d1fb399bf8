"""The prefix cache's books without torch: block hashes, LRU eviction, holds, forgetting."""

from __future__ import annotations

import pytest

from runtime.scheduling.block_manager import BlockManager
from runtime.scheduling.prefix_hashes import BlockHashes, chain, root_hash
from runtime.scheduling.scheduler import Scheduler
from runtime.scheduling.sequence import Sequence
from runtime.types import AdapterRef, EngineRequest, SamplingParams

pytestmark = pytest.mark.unit


def ref(sha: str, name: str) -> AdapterRef:
    return AdapterRef.for_version(sha * 64, "file:///unused", 8, 16.0, ("q_proj",), name=name)


def test_the_root_separates_tenants_adapters_and_versions() -> None:
    roots = {
        root_hash("acme", None), root_hash("globex", None),
        root_hash("acme", ref("a", "acme/x@1")), root_hash("acme", ref("a", "acme/x@2")),
        root_hash("acme", ref("b", "acme/x@1")), root_hash("globex", ref("a", "acme/x@1")),
        # Length-prefixed parts: moving characters between tenant and name changes the root.
        root_hash("acme/", ref("a", "x@1")), root_hash("acme", ref("a", "/x@1")),
    }
    assert len(roots) == 8


def test_a_block_hash_stands_for_every_token_before_it() -> None:
    root = root_hash("acme", None)
    a, b = BlockHashes(root, 4), BlockHashes(root, 4)
    same_first = a.upto([1, 2, 3, 4, 5, 6, 7, 8], 2)
    other_first = b.upto([9, 2, 3, 4, 5, 6, 7, 8], 2)
    assert same_first[1] != other_first[1]  # same second block, different history
    assert same_first[0] == chain(root, [1, 2, 3, 4])
    assert a.upto([1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0], 3)[:2] == same_first  # memoized prefix


def test_unheld_cached_blocks_are_reused_last_and_evicted_fairly() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    first, second = [], []
    bm.allocate(first, 4)  # blocks 0, 1
    bm.allocate(second, 4)  # blocks 2, 3
    for i, block in enumerate(first):
        bm.register(block, bytes([1, i]), "acme")
    for i, block in enumerate(second):
        bm.register(block, bytes([2, i]), "globex")
    bm.free(first)
    bm.free(second)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4
    assert list(bm.free_blocks) == []  # all four keep their K/V, evictable
    # Equal shares: the least recently freed first, and of one table its tail first.
    grown: list[int] = []
    bm.allocate(grown, 2)
    assert grown == [1]
    assert bm.evictions == {"acme": 1}
    assert bm.lookup([bytes([1, 0]), bytes([1, 1])]) == [0]  # its head is still there
    # globex now holds more of the cache: its tail goes before acme's older head.
    bm.allocate(grown, 4)
    assert grown == [1, 3]
    assert bm.evictions == {"acme": 1, "globex": 1}
    bm.allocate(grown, 6)  # equal again: the least recently freed of the two
    assert grown == [1, 3, 0]
    assert bm.evictions == {"acme": 2, "globex": 1}
    assert bm.lookup([bytes([2, 0])]) == [2]


def test_a_tenant_streaming_unique_prompts_evicts_its_own_blocks_not_others() -> None:
    """A stranger's traffic must not push a tenant's cached prefix out: once the flooding
    tenant holds the larger share of the evictable blocks, it evicts its own (a global LRU
    would take the victim's, the oldest, first)."""
    bm = BlockManager(num_blocks=10, block_size=2)
    prefix: list[int] = []
    bm.allocate(prefix, 8)  # the victim's 4-block system prompt
    victim = [bytes([0, i]) for i in range(4)]
    for block, digest in zip(prefix, victim, strict=True):
        bm.register(block, digest, "victim")
    bm.free(prefix)
    for n in range(30):  # unique 2-block prompts, one after another
        table: list[int] = []
        bm.allocate(table, 4)
        for i, block in enumerate(table):
            bm.register(block, bytes([1, n, i]), "flood")
        bm.free(table)
    assert len(bm.lookup(victim)) == 4  # all four still cached
    assert "victim" not in bm.evictions and bm.evictions["flood"] == 2 * 30 - 6
    assert bm.evictable_by_tenant == {"victim": 4, "flood": 6}
    # A share is no reservation: a prompt that needs every block still gets them.
    big: list[int] = []
    bm.allocate(big, 20)
    assert sorted(bm.evictions.items()) == [("flood", 2 * 30), ("victim", 4)]


def test_holding_a_hit_takes_it_out_of_the_lru_and_can_admit_counts_it() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    table: list[int] = []
    bm.allocate(table, 4)
    bm.register(table[0], b"h0", "acme")
    bm.register(table[1], b"h1", "acme")
    bm.free(table)
    hits = bm.lookup([b"h0", b"h1", b"h2"])
    assert hits == [0, 1]
    # The two hits plus one new block fit; a fourth block would not: the unheld hits are
    # no longer free once taken.
    assert bm.can_admit(hits, 6)
    assert not bm.can_admit(hits, 8)
    bm.acquire(hits)
    assert bm.num_free_blocks == 1 and not bm.evictable
    other: list[int] = []
    bm.acquire(bm.lookup([b"h0"]))  # a second holder of the same block
    other.append(0)
    assert bm.ref_counts[0] == 2
    bm.free(other)
    assert bm.ref_counts[0] == 1 and 0 not in bm.evictable  # still held by the first


def test_forget_withdraws_blocks_and_duplicates_keep_the_first() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a: list[int] = []
    b: list[int] = []
    bm.allocate(a, 2)
    bm.allocate(b, 2)
    bm.register(a[0], b"same", "acme")
    bm.register(b[0], b"same", "acme")  # two blocks alike: one entry
    assert bm.lookup([b"same"]) == [a[0]]
    bm.forget(a)
    assert bm.lookup([b"same"]) == []
    held = a[0]
    bm.free(a)
    assert held in bm.free_blocks  # forgotten: back to the free list, not the LRU


def seq(rid: str, tokens: list[int], tenant: str = "acme") -> Sequence:
    sampling = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    return Sequence(EngineRequest(rid, tokens, sampling, tenant=tenant), arrival=0)


def run_prefill(s: Scheduler, q: Sequence) -> None:
    s.add(q)
    while q.num_uncached_tokens > 0:
        s.advance(s.schedule()[0])


def test_the_scheduler_admits_from_the_cache_and_counts_by_tenant() -> None:
    s = Scheduler(num_blocks=16, block_size=4, max_running=4, max_batch_tokens=64,
                  max_model_len=64)
    run_prefill(s, seq("a", list(range(1, 14))))  # 13 tokens: three full blocks registered
    s.abort("a")
    b = seq("b", list(range(1, 14)) + [50, 51])
    run_prefill(s, b)
    assert b.num_cached_prompt_tokens == 12
    c = seq("c", list(range(1, 14)), tenant="globex")
    run_prefill(s, c)
    assert c.num_cached_prompt_tokens == 0
    tenants = s.prefix_cache_stats()["tenants"]
    assert tenants == {"acme": {"queried_tokens": 28, "cached_tokens": 12, "evicted_blocks": 0},
                       "globex": {"queried_tokens": 13, "cached_tokens": 0, "evicted_blocks": 0}}
    off = Scheduler(num_blocks=16, block_size=4, max_running=4, max_batch_tokens=64,
                    max_model_len=64, enable_prefix_caching=False)
    run_prefill(off, seq("a", list(range(1, 14))))
    off.abort("a")
    d = seq("d", list(range(1, 14)))
    run_prefill(off, d)
    assert d.num_cached_prompt_tokens == 0 and off.block_manager.num_cached_blocks == 0


def test_an_abort_mid_prefill_gives_back_its_cached_blocks_and_fills_none() -> None:
    s = Scheduler(num_blocks=16, block_size=4, max_running=4, max_batch_tokens=6,
                  max_model_len=64)
    run_prefill(s, seq("a", list(range(1, 14))))  # three blocks registered
    s.abort("a")
    b = seq("b", list(range(1, 14)) + list(range(20, 32)))
    s.add(b)
    s.advance(s.schedule()[0])  # hits three blocks, then a 6-token chunk of the rest
    assert b.num_cached_tokens == 12 + 6
    bm = s.block_manager
    shared = b.block_table[:3]
    assert all(bm.ref_counts[block] == 1 for block in shared)
    # a's three, and b's fourth (tokens 12..15), which the chunk filled; not its half fifth.
    assert bm.num_cached_blocks == 4
    s.abort("b")
    assert all(n == 0 for n in bm.ref_counts)
    assert bm.num_free_blocks == bm.num_blocks
    assert set(shared) <= set(bm.evictable)  # still cached for the next prompt
    assert bm.num_cached_blocks == 4

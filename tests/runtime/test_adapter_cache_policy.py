"""The adapter cache's policy, without torch: LRU tiers, slot refcounts, loads and failures."""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import Future

import pytest

from runtime.lora.cache import AdapterCache
from runtime.lora.lru import LruTier, SlotTable
from runtime.lora.protocol import AdapterUnavailable, FetchError, LoadResult
from runtime.types import AdapterRef

pytestmark = pytest.mark.unit


def ref(i: int) -> AdapterRef:
    key = hashlib.sha256(f"adapter-{i}".encode()).hexdigest()
    return AdapterRef(key=key, uri=f"file:///x/{key}", rank=4, alpha=8.0,
                      target_modules=("q_proj",), name=f"t/a{i}@1")


class FakeLoader:
    """Futures the test completes by hand; counts how many loads each key caused."""

    def __init__(self) -> None:
        self.pending: dict[str, Future[LoadResult]] = {}
        self.calls: dict[str, int] = {}

    def load(self, r: AdapterRef) -> Future[LoadResult]:
        self.calls[r.key] = self.calls.get(r.key, 0) + 1
        fut: Future[LoadResult] = Future()
        self.pending[r.key] = fut
        return fut

    def finish(self, r: AdapterRef, source: str = "store") -> None:
        self.pending.pop(r.key).set_result(LoadResult(r.key, f"w:{r.key}", source, 0.02, 100))

    def num_disk_entries(self) -> int | None:
        return None

    def shutdown(self) -> None:
        pass

    def fail(self, r: AdapterRef, message: str) -> None:
        self.pending.pop(r.key).set_exception(RuntimeError(message))

    def finish_all(self) -> None:
        for key in list(self.pending):
            self.pending.pop(key).set_result(LoadResult(key, f"w:{key}", "store", 0.02, 100))


def make_cache(slots: int = 2, host: int = 4, **kw):
    loader = FakeLoader()
    installed: dict[int, str] = {}
    cache = AdapterCache(slots, host, loader, lambda s, w: installed.__setitem__(s, w), **kw)
    return cache, loader, installed


def acquire_now(cache: AdapterCache, loader: FakeLoader, r: AdapterRef) -> int:
    assert cache.try_acquire(r) is None
    loader.finish(r)
    slot = cache.try_acquire(r)
    assert slot is not None
    return slot


def test_lru_tier_evicts_oldest_unpinned_and_prefers_the_predicate() -> None:
    tier: LruTier[str, int] = LruTier(3)
    for k in "abc":
        tier.put(k, 0)
    tier.get("a")  # a is now the most recent: b is the oldest
    tier.pin("b")
    assert tier.put("d", 0) == ["c"]  # b pinned, c next oldest
    assert tier.put("e", 0, prefer=lambda k: k == "d") == ["d"]
    tier.unpin("b")
    assert tier.put("f", 0) == ["b"]
    assert sorted(tier.keys()) == ["a", "e", "f"]


def test_lru_tier_in_bytes_keeps_entries_when_everything_is_pinned() -> None:
    tier: LruTier[str, int] = LruTier(100)
    tier.put("a", 0, size=60)
    tier.pin("a")
    assert tier.put("b", 0, size=60) == []
    assert tier.used == 120 and "a" in tier and "b" in tier
    tier.unpin("a")
    assert tier.put("c", 0, size=10) == ["a"]
    assert tier.used == 70


def test_slot_table_never_offers_a_held_slot() -> None:
    table = SlotTable(2)
    s0 = table.victim()
    table.assign(s0, "a")
    table.acquire("a")
    s1 = table.victim()
    assert s1 != s0
    table.assign(s1, "b")
    table.acquire("b")
    assert table.victim() is None
    with pytest.raises(ValueError):
        table.assign(s0, "c")
    table.release("b")
    assert table.victim() == s1
    with pytest.raises(KeyError):
        table.release("b")


def test_cold_adapter_loads_once_for_many_requests_then_hits_device() -> None:
    cache, loader, installed = make_cache()
    r = ref(1)
    for _ in range(5):
        assert cache.try_acquire(r) is None
    assert loader.calls == {r.key: 1}
    loader.finish(r)
    slots = {cache.try_acquire(r) for _ in range(5)}
    assert len(slots) == 1
    slot = slots.pop()
    assert installed[slot] == f"w:{r.key}"
    assert cache.slots.refcount(r.key) == 5
    stats = cache.stats()
    assert stats["loads"] == 1 and stats["hits"]["store"] == 1 and stats["hits"]["device"] == 4
    assert stats["load_seconds"]["count"] == 1 and stats["load_seconds"]["buckets"]["0.025"] == 1


def test_held_slots_are_never_evicted_and_cold_adapters_wait() -> None:
    cache, loader, installed = make_cache(slots=2, host=4)
    a, b, c = ref(1), ref(2), ref(3)
    sa, sb = acquire_now(cache, loader, a), acquire_now(cache, loader, b)
    assert cache.try_acquire(c) is None
    loader.finish(c)
    for _ in range(3):  # both slots held: c waits in host, nothing is evicted
        assert cache.try_acquire(c) is None
    assert installed == {sa: f"w:{a.key}", sb: f"w:{b.key}"}
    cache.release(a.key)
    sc = cache.try_acquire(c)
    assert sc == sa and installed[sa] == f"w:{c.key}"
    evicted = [e for e in cache.events if e.kind == "evict" and e.tier == "device"]
    assert [(e.key, e.slot) for e in evicted] == [(a.key, sa)]
    # a is still in the host tier: its next use is a host hit, not a load.
    cache.release(b.key)
    assert cache.try_acquire(a) == sb
    assert loader.calls[a.key] == 1 and cache.stats()["hits"]["host"] == 1


def test_idle_slots_are_reused_least_recently_used_first() -> None:
    cache, loader, _ = make_cache(slots=2, host=8)
    a, b, c = ref(1), ref(2), ref(3)
    sa, sb = acquire_now(cache, loader, a), acquire_now(cache, loader, b)
    cache.release(b.key)
    cache.release(a.key)  # a released last: b is the LRU idle slot
    assert acquire_now(cache, loader, c) == sb
    assert cache.slots.slot_of(a.key) == sa and cache.slots.slot_of(b.key) is None


def test_failure_fails_that_adapter_only_and_is_retried_after_the_ttl() -> None:
    now = [0.0]
    cache, loader, _ = make_cache(failure_ttl_s=10.0, clock=lambda: now[0])
    bad, good = ref(1), ref(2)
    assert cache.try_acquire(bad) is None
    assert cache.try_acquire(good) is None
    loader.fail(bad, "sha256 mismatch: expected 00.. got 11..")
    loader.finish(good)
    for _ in range(2):  # every waiting request of that adapter gets the reason
        with pytest.raises(AdapterUnavailable, match="t/a1@1 failed to load: sha256 mismatch"):
            cache.try_acquire(bad)
    assert cache.try_acquire(good) is not None
    now[0] = 11.0
    assert cache.try_acquire(bad) is None  # a new attempt after the TTL
    assert loader.calls[bad.key] == 2
    assert cache.stats()["load_failures"] == 1


class StoreDown(FetchError):
    """What the store raises when it stays unreachable: transient."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


def test_transient_failure_is_remembered_only_briefly() -> None:
    now = [0.0]
    cache, loader, _ = make_cache(failure_ttl_s=30.0, transient_failure_ttl_s=2.0,
                                  clock=lambda: now[0])
    down = ref(1)
    assert cache.try_acquire(down) is None
    loader.pending.pop(down.key).set_exception(StoreDown("store unreachable after 4 attempts"))
    with pytest.raises(AdapterUnavailable, match="store unreachable"):
        cache.try_acquire(down)  # requests in the same moment fail fast, no new fetch
    assert loader.calls[down.key] == 1
    now[0] = 2.5  # the store is back: far sooner than a permanent failure's TTL
    assert cache.try_acquire(down) is None
    loader.finish(down)
    assert cache.try_acquire(down) is not None
    assert loader.calls[down.key] == 2


def test_key_that_is_not_a_sha256_is_refused() -> None:
    cache, _, _ = make_cache()
    with pytest.raises(AdapterUnavailable, match="not a sha256"):
        cache.try_acquire(AdapterRef(key="../etc", uri="file:///x", rank=4, alpha=4.0,
                                     target_modules=("q_proj",)))


def test_cold_flood_never_evicts_loaded_adapters_before_their_first_use() -> None:
    cache, loader, _ = make_cache(slots=1, host=3)
    refs = [ref(i) for i in range(10)]
    held = acquire_now(cache, loader, refs[0])
    for _ in range(3):  # waiting requests ask again every step
        for r in refs[1:]:
            cache.try_acquire(r)
        loader.finish_all()
    # The one slot is held, so only the host's capacity of cold adapters was loaded, and
    # nothing twice: loaded-but-unused entries keep their place; the host copy of the
    # adapter already on the device is the one that made room.
    assert sum(loader.calls.values()) == 1 + 3
    assert all(n == 1 for n in loader.calls.values())
    evicted = [(e.key, e.tier) for e in cache.events if e.kind == "evict"]
    assert evicted == [(refs[0].key, "host")]
    assert cache.slots.slot_of(refs[0].key) == held


def test_random_workload_keeps_refcounts_and_slots_consistent() -> None:
    rng = random.Random(7)
    cache, loader, installed = make_cache(slots=3, host=5)
    refs = [ref(i) for i in range(12)]
    held: list[tuple[str, int]] = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.5:
            r = rng.choice(refs)
            slot = cache.try_acquire(r)
            if slot is not None:
                held.append((r.key, slot))
        elif op < 0.8 and held:
            key, _ = held.pop(rng.randrange(len(held)))
            cache.release(key)
        else:
            loader.finish_all()
        for key, slot in held:  # whatever happened, every held adapter is still in its slot
            assert installed[slot] == f"w:{key}"
    # Rebuild refcounts from the event log alone: no eviction ever hit a held adapter.
    refs_count: dict[str, int] = {}
    for e in cache.events:
        if e.kind == "acquire":
            refs_count[e.key] = refs_count.get(e.key, 0) + 1
        elif e.kind == "release":
            refs_count[e.key] -= 1
        elif e.kind == "evict" and e.tier == "device":
            assert refs_count.get(e.key, 0) == 0
    assert len(cache.host) <= 5


def test_prefetch_loads_queued_adapters_as_host_room_frees() -> None:
    cache, loader, installed = make_cache(slots=2, host=2)
    refs = [ref(i) for i in range(5)]
    for r in refs:  # five requests arrive; the host tier has room for two loads
        cache.prefetch(r)
    assert set(loader.calls) == {refs[0].key, refs[1].key}
    assert cache.try_acquire(refs[3]) is None  # asked early: waits its turn, starts nothing
    assert len(loader.calls) == 2
    loader.finish_all()
    assert cache.try_acquire(refs[0]) is not None  # installing 0 frees a load: 2 starts
    assert set(loader.calls) == {r.key for r in refs[:3]}
    assert cache.try_acquire(refs[1]) is not None  # and now 3, kept in the queue
    assert set(loader.calls) == {r.key for r in refs[:4]}
    loader.finish_all()
    cache.release(refs[0].key)
    assert cache.try_acquire(refs[2]) is not None
    assert all(n == 1 for n in loader.calls.values())  # nothing loaded twice
    assert installed  # and what was installed came from those loads
    cache.prefetch(AdapterRef(key="nope", uri="file:///x", rank=4, alpha=4.0,
                              target_modules=("q_proj",)))  # ignored, not raised


def test_stats_count_the_slots_running_requests_hold() -> None:
    cache, loader, _ = make_cache(slots=3, host=4)
    a, b = ref(1), ref(2)
    assert cache.stats()["slots"] == {"held": 0, "total": 3}
    acquire_now(cache, loader, a)
    assert cache.try_acquire(a) is not None  # resident: a second request holds it too
    acquire_now(cache, loader, b)
    assert cache.stats()["slots"] == {"held": 2, "total": 3}
    cache.release(a.key)
    cache.release(b.key)
    assert cache.stats()["slots"] == {"held": 1, "total": 3}  # a is still held once
    cache.release(a.key)
    assert cache.stats()["slots"]["held"] == 0
    assert cache.stats()["resident"]["device"] == 2  # idle slots keep their adapters

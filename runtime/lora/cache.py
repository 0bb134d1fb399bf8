"""The tiered adapter cache: device slots over a host tier over the loader (disk, then store).

Free of torch: the weights are opaque values here, the copy into a device slot is the
injected `install(slot, weights)` (LoraManager.set_lora) and loads are the injected
`loader.load(ref) -> Future[LoadResult]` (runtime/lora/store.py; the types both sides share
are in runtime/lora/protocol.py). `AdapterCache` is the scheduler's AdapterProvider:

    slot = cache.try_acquire(ref)   # pinned device slot, or None while the adapter loads
    cache.release(ref.key)          # once per successful try_acquire, when the request ends

Rules: a slot whose adapter a running request holds (refcount > 0) is never evicted; when
every slot is held, a cold adapter waits (no thrashing) and the batch keeps running; many
requests for one cold adapter cause one load; a failed load fails the requests of that
adapter only, with the reason, and is retried by a later request after `failure_ttl_s`
(`transient_failure_ttl_s` when the loader's FetchError says `transient`: a store that was
unreachable may be back, and its adapters must not stay refused for long after). An install
that fails (`install` raised) fails that adapter's requests the same way and leaves the slot
empty; it never fails the step, so the rest of the batch runs on.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from runtime.lora.lru import LruTier, SlotTable
from runtime.lora.protocol import (
    ADAPTER_KEY_RE,
    AdapterUnavailable,
    FetchError,
    Loader,
    LoadResult,
)
from runtime.types import AdapterRef

LOAD_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class CacheEvent:
    seq: int
    # acquire | release | install | install_failed | evict | load_start | load_done | load_failed
    kind: str
    key: str
    tier: str  # device | host | disk | store
    slot: int = -1


class AdapterCache:
    """AdapterProvider for the scheduler: device slots over a host LRU over async loads."""

    def __init__(
        self,
        num_slots: int,
        max_host_adapters: int,
        loader: Loader,
        install: Callable[[int, Any], None],
        *,
        failure_ttl_s: float = 30.0,
        transient_failure_ttl_s: float = 2.0,
        max_events: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_slots < 1 or max_host_adapters < 1:
            raise ValueError("num_slots and max_host_adapters must be at least 1")
        self.slots = SlotTable(num_slots)
        self.host: LruTier[str, Any] = LruTier(max_host_adapters)
        self._loader = loader
        self._install = install
        self._failure_ttl_s = failure_ttl_s
        self._transient_failure_ttl_s = transient_failure_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._loading: dict[str, Future[LoadResult]] = {}
        self._fresh: set[str] = set()  # loaded into host, not yet installed: not a host hit
        self._failed: dict[str, tuple[str, float, float]] = {}  # key -> (reason, when, ttl)
        self._prefetch: OrderedDict[str, AdapterRef] = OrderedDict()  # waiting requests' refs
        self._seq = 0
        self.events: deque[CacheEvent] = deque(maxlen=max_events)
        self.hits = {"device": 0, "host": 0, "disk": 0, "store": 0}
        self.evictions = {"device": 0, "host": 0}
        self.num_loads = 0
        self.num_load_failures = 0
        self.load_seconds = [0] * (len(LOAD_SECONDS_BUCKETS) + 1)  # last: +Inf
        self.load_seconds_sum = 0.0

    # --- AdapterProvider -------------------------------------------------------------
    def try_acquire(self, ref: AdapterRef) -> int | None:
        """A pinned device slot holding `ref`, or None while it loads or every slot is held.

        Raises AdapterUnavailable when the adapter failed to load (bad hash, unreachable
        store, malformed weights) or its key is not a sha256.
        """
        key = ref.key
        if not ADAPTER_KEY_RE.match(key):
            raise AdapterUnavailable(f"adapter {ref.name or key!r}: key is not a sha256 hex")
        with self._lock:
            if self.slots.slot_of(key) is not None:
                self.hits["device"] += 1
                return self._acquire(key)
            self._collect()
            failure = self._failed.get(key)
            if failure is not None:
                if self._clock() - failure[1] < failure[2]:
                    name = ref.name or key
                    raise AdapterUnavailable(f"adapter {name} failed to load: {failure[0]}")
                del self._failed[key]
            weights = self.host.get(key)
            if weights is None:
                if not self._start_load(ref):
                    self._prefetch.setdefault(key, ref)  # keeps its place in the queue
                return None
            slot = self.slots.victim()
            if slot is None:
                return None  # every slot serves a running request: wait, never thrash
            self._place(slot, ref, weights)
            self._pump()  # installing it freed load budget: start the next queued adapters
            return self._acquire(key)

    def release(self, key: str) -> None:
        with self._lock:
            self.slots.release(key)
            slot = self.slots.slot_of(key)
            self._log("release", key, "device", -1 if slot is None else slot)
            self._collect()
            self._pump()

    def prefetch(self, ref: AdapterRef) -> None:
        """Load `ref` ahead of its request's admission, as the host tier has room.

        The engine calls it when a request arrives, so the adapters of queued requests load
        while the running batch decodes instead of after a slot frees.
        """
        if not ADAPTER_KEY_RE.match(ref.key):
            return  # try_acquire gives the request its error
        with self._lock:
            if ref.key not in self._prefetch:
                self._prefetch[ref.key] = ref
            self._collect()
            self._pump()

    # --- internals (caller holds the lock) --------------------------------------------
    def _acquire(self, key: str) -> int:
        slot = self.slots.acquire(key)
        self._log("acquire", key, "device", slot)
        return slot

    def _place(self, slot: int, ref: AdapterRef, weights: Any) -> None:
        """Install `ref` in the idle `slot`; AdapterUnavailable (for its requests only) if the
        install fails, with the slot then empty: its old adapter is not trusted to be intact."""
        key = ref.key
        old = self.slots.key_of(slot)
        if old is not None:
            self.evictions["device"] += 1
            self._log("evict", old, "device", slot)
        try:
            self._install(slot, weights)
        except Exception as exc:
            # The slot table must never map an adapter to a slot whose weights may be another
            # adapter's: empty it. Its old adapter reloads from the host tier when asked for.
            self.slots.unassign(slot)
            self.host.remove(key)
            self._fresh.discard(key)
            reason = str(exc) or type(exc).__name__
            self._failed[key] = (reason, self._clock(), self._failure_ttl_s)
            self.num_load_failures += 1
            self._log("install_failed", key, "device", slot)
            raise AdapterUnavailable(
                f"adapter {ref.name or key} could not be installed: {reason}"
            ) from exc
        self.slots.assign(slot, key)
        if key in self._fresh:
            self._fresh.discard(key)
        else:
            self.hits["host"] += 1
        self._log("install", key, "device", slot)

    def _start_load(self, ref: AdapterRef) -> bool:
        """Start loading unless it already loads or the load budget is spent; True if it loads."""
        if ref.key in self._loading:
            return True
        # Loaded-but-not-installed entries must not push each other out of the host tier,
        # or a flood of cold adapters would load, evict and reload forever.
        if len(self._loading) + len(self._fresh) >= self.host.capacity:
            return False
        self._prefetch.pop(ref.key, None)
        self._loading[ref.key] = self._loader.load(ref)
        self._log("load_start", ref.key, "store")
        return True

    def _pump(self) -> None:
        """Start queued prefetches, oldest first, while the load budget allows."""
        while self._prefetch and len(self._loading) + len(self._fresh) < self.host.capacity:
            key, ref = self._prefetch.popitem(last=False)
            if key not in self.host and key not in self._failed and self.slots.slot_of(key) is None:
                self._start_load(ref)

    def _collect(self) -> None:
        """Move finished loads into the host tier (or the failure table)."""
        for key, future in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[key]
            error = future.exception()
            if error is not None:
                self.num_load_failures += 1
                # A permanent failure (bad hash, missing object, weights that do not parse)
                # is remembered long; a store outage only briefly, or its adapters would stay
                # refused for the whole TTL after the store came back.
                transient = isinstance(error, FetchError) and error.transient
                ttl = self._transient_failure_ttl_s if transient else self._failure_ttl_s
                self._failed[key] = (str(error) or type(error).__name__, self._clock(), ttl)
                self._log("load_failed", key, "store")
                continue
            result = future.result()
            self.num_loads += 1
            self.hits[result.source] += 1
            self._observe(result.seconds)
            self._fresh.add(key)
            for victim in self.host.put(key, result.weights, prefer=self._on_device):
                self._fresh.discard(victim)
                self.evictions["host"] += 1
                self._log("evict", victim, "host")
            self._log("load_done", key, result.source)

    def _on_device(self, key: str) -> bool:
        # The host copy of an adapter already on the device is the cheapest to drop.
        return self.slots.slot_of(key) is not None

    def _observe(self, seconds: float) -> None:
        self.load_seconds_sum += seconds
        for i, bound in enumerate(LOAD_SECONDS_BUCKETS):
            if seconds <= bound:
                self.load_seconds[i] += 1
                return
        self.load_seconds[-1] += 1

    def _log(self, kind: str, key: str, tier: str, slot: int = -1) -> None:
        self._seq += 1
        self.events.append(CacheEvent(self._seq, kind, key, tier, slot))

    # --- figures ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop the loader's threads (loads in flight finish, queued ones are dropped)."""
        self._loader.shutdown()

    def stats(self) -> dict[str, Any]:
        """The `adapters` object of GET /stats (see docs/internals.md)."""
        disk_resident = self._loader.num_disk_entries()
        with self._lock:
            counts, cumulative = {}, 0
            for bound, n in zip(LOAD_SECONDS_BUCKETS, self.load_seconds, strict=False):
                cumulative += n
                counts[str(bound)] = cumulative
            counts["+Inf"] = cumulative + self.load_seconds[-1]
            return {
                "resident": {
                    "device": len(self.slots.resident()),
                    "host": len(self.host),
                    "disk": disk_resident,
                },
                "hits": dict(self.hits),
                "loads": self.num_loads,
                "load_failures": self.num_load_failures,
                "loading": len(self._loading),
                "evictions": dict(self.evictions),
                "load_seconds": {"buckets": counts, "sum": self.load_seconds_sum,
                                 "count": counts["+Inf"]},
            }

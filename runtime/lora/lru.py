"""The policy primitives of the adapter cache: an LRU tier with pins, and the device slot table.

Plain Python, no torch: the scheduler's process imports them without the model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruTier(Generic[K, V]):
    """LRU over keys with a capacity in units (1 per entry, or bytes); pinned keys stay."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # oldest first
        self._pins: dict[K, int] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[K]:
        return list(self._entries)

    def get(self, key: K) -> V | None:
        """The value, marked most recently used; None when absent."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def pin(self, key: K) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: K) -> None:
        count = self._pins.get(key, 0) - 1
        if count > 0:
            self._pins[key] = count
        else:
            self._pins.pop(key, None)

    def pinned(self, key: K) -> bool:
        return key in self._pins

    def remove(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.used -= entry[1]
        return entry[0]

    def put(
        self, key: K, value: V, size: int = 1, prefer: Callable[[K], bool] | None = None
    ) -> list[K]:
        """Insert as most recent; evict unpinned LRU keys (those `prefer` picks first) to fit.

        Returns the evicted keys. The new entry stays even when pinned entries keep the tier
        over capacity: refusing it would only make its caller load it again.
        """
        self.remove(key)
        evicted: list[K] = []
        while self.used + size > self.capacity:
            victim = self._victim(prefer)
            if victim is None:
                break
            self.remove(victim)
            evicted.append(victim)
        self._entries[key] = (value, size)
        self.used += size
        return evicted

    def _victim(self, prefer: Callable[[K], bool] | None) -> K | None:
        fallback = None
        for key in self._entries:  # oldest first
            if key in self._pins:
                continue
            if prefer is None or prefer(key):
                return key
            if fallback is None:
                fallback = key
        return fallback


class SlotTable:
    """Which adapter key sits in which device slot, with refcounts and LRU among idle slots."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._key_of: list[str | None] = [None] * num_slots
        self._slot_of: dict[str, int] = {}
        self._refs: dict[str, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))

    def slot_of(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def key_of(self, slot: int) -> str | None:
        return self._key_of[slot]

    def refcount(self, key: str) -> int:
        return self._refs.get(key, 0)

    def resident(self) -> list[str]:
        return list(self._slot_of)

    def acquire(self, key: str) -> int:
        slot = self._slot_of[key]
        self._refs[key] = self._refs.get(key, 0) + 1
        self._idle.pop(slot, None)
        return slot

    def release(self, key: str) -> None:
        count = self._refs.get(key, 0) - 1
        if count < 0:
            raise KeyError(f"release of an adapter that is not held: {key}")
        if count == 0:
            del self._refs[key]
            self._idle[self._slot_of[key]] = None  # most recently used idle slot
        else:
            self._refs[key] = count

    def victim(self) -> int | None:
        """An empty slot, else the least recently used idle one; None when all are held."""
        for slot in self._idle:
            if self._key_of[slot] is None:
                return slot
        return next(iter(self._idle), None)

    def assign(self, slot: int, key: str) -> str | None:
        """Put `key` in an idle `slot`; returns the key it evicts."""
        if slot not in self._idle:
            raise ValueError(f"slot {slot} is held by a running request")
        old = self._key_of[slot]
        if old is not None:
            del self._slot_of[old]
        self._key_of[slot] = key
        self._slot_of[key] = slot
        return old

    def unassign(self, slot: int) -> str | None:
        """Empty an idle `slot` (its contents are no longer trusted); returns the key it held."""
        if slot not in self._idle:
            raise ValueError(f"slot {slot} is held by a running request")
        old = self._key_of[slot]
        if old is not None:
            del self._slot_of[old]
        self._key_of[slot] = None
        return old

"""Slot caches with an eviction policy that weighs recency and frequency (LRFU), and their counters.

A `SlotCache` maps keys (expert ids, or (layer, expert) pairs) to a fixed number of slots. Each key carries a
combined recency-frequency value C = sum over past uses of 2^(-decay * age): decay 0 is LFU, decay 1 behaves like
LRU, values between blend them (Lee et al., "LRFU", IEEE TC 2001). The victim is the unpinned key with the smallest
C now. Pinned keys (in use by a computation or a copy in flight) are never evicted. Pure bookkeeping: the caller
moves the bytes into the slot it is given.

Finding the victim is O(log n): every key's C decays by the same factor per tick, so the order of two keys changes
only when one is used, and log2(C) + decay * (time of last use) ranks the keys at every instant. A heap holds one
entry per use (stale entries are skipped and compacted away). A scan over all keys cost ~160 us per eviction at
282 slots, once per expert copied: ~7 ms of a 39 ms decode step on the V3 slice at batch 1.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from typing import Hashable, Iterable


@dataclasses.dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class SlotCache:
    """Example:
        >>> c = SlotCache(capacity=4, decay=0.1)
        >>> slot, evicted = c.insert(17)       # a miss: the caller copies expert 17 into `slot`
        >>> c.lookup(17)                        # later: a hit
    """

    def __init__(self, capacity: int, decay: float = 0.1):
        if capacity < 0:
            raise ValueError(f"capacity={capacity} must be >= 0")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay={decay} must lie in [0, 1] (0 = LFU, 1 = LRU-like)")
        self.capacity = capacity
        self.decay = decay
        self.counters = CacheCounters()
        self._slot: dict[Hashable, int] = {}
        self._crf: dict[Hashable, float] = {}
        self._pins: dict[Hashable, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._clock = 0
        self._heap: list[tuple] = []                   # (log2 C + decay * last use, last use, arrival, key)
        self._entry: dict[Hashable, tuple] = {}        # key -> its live heap entry (ties: the key cached first goes)
        self._aside: dict[Hashable, tuple] = {}        # pinned keys met at the heap's top: back in when unpinned
        self._arrivals = itertools.count()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def keys(self) -> list[Hashable]:
        return list(self._slot)

    def tick(self) -> None:
        """Advance time by one step (a decoded token)."""
        self._clock += 1

    def _value(self, key: Hashable) -> float:
        return self._crf[key] * 2.0 ** (-self.decay * (self._clock - self._entry[key][1]))

    def _touch(self, key: Hashable) -> None:
        old = self._entry.get(key)
        self._crf[key] = (self._value(key) if old else 0.0) + 1.0
        arrival = old[2] if old else next(self._arrivals)
        entry = (math.log2(self._crf[key]) + self.decay * self._clock, self._clock, arrival, key)
        self._entry[key] = entry
        self._aside.pop(key, None)
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 4 * len(self._entry) + 64:      # drop the stale entries
            self._heap = [e for k, e in self._entry.items() if k not in self._aside]
            heapq.heapify(self._heap)

    def _victim(self) -> Hashable | None:
        """The unpinned key with the smallest C now (oldest last use, then first cached, on ties); None if all are
        pinned."""
        while self._heap:
            entry = self._heap[0]
            key = entry[3]
            if self._entry.get(key) is not entry:              # used again since, or evicted
                heapq.heappop(self._heap)
            elif self._pins.get(key):                          # set aside until unpinned (not re-pushed per search)
                self._aside[key] = heapq.heappop(self._heap)
            else:
                return key
        return None

    def _forget(self, key: Hashable) -> int:
        self._aside.pop(key, None)
        self._crf.pop(key)
        self._entry.pop(key)
        self.counters.evictions += 1
        return self._slot.pop(key)

    def lookup(self, key: Hashable) -> int | None:
        """The key's slot on a hit (counted and touched), None on a miss (counted)."""
        slot = self._slot.get(key)
        if slot is None:
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self._touch(key)
        return slot

    def peek(self, key: Hashable) -> int | None:
        """The key's slot without counting or touching (for prefetch decisions)."""
        return self._slot.get(key)

    def insert(self, key: Hashable, pin: bool = False) -> tuple[int, Hashable | None]:
        """A slot for `key` (which must be absent), evicting the lowest-valued unpinned key if full.

        Returns (slot, evicted key or None). Raises RuntimeError if every slot is pinned.
        """
        if key in self._slot:
            raise KeyError(f"{key!r} is already cached in slot {self._slot[key]}")
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted = self._victim()
            if evicted is None:
                raise RuntimeError(f"all {self.capacity} slots are pinned; the cache is too small for the work in "
                                   "flight (raise its budget or lower prefetch depth)")
            slot = self._forget(evicted)
        self._slot[key] = slot
        self._touch(key)
        if pin:
            self.pin(key)
        return slot, evicted

    def evict_one(self) -> Hashable:
        """Evict the lowest-valued unpinned key now and return it (RuntimeError if all are pinned)."""
        victim = self._victim()
        if victim is None:
            raise RuntimeError(f"all {self.capacity} slots are pinned")
        self._free.append(self._forget(victim))
        return victim

    def pinned_count(self) -> int:
        return len(self._pins)

    def pin(self, key: Hashable) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Hashable) -> None:
        n = self._pins.get(key, 0) - 1
        if n < 0:
            raise ValueError(f"{key!r} is not pinned")
        if n:
            self._pins[key] = n
        else:
            self._pins.pop(key)
            entry = self._aside.pop(key, None)
            if entry is not None:
                heapq.heappush(self._heap, entry)

    def unpin_all(self, keys: Iterable[Hashable]) -> None:
        for k in keys:
            self.unpin(k)

    def clear_pins(self) -> None:
        """Unpin every key however often it was pinned (after a failed step)."""
        for k in list(self._pins):
            while k in self._pins:
                self.unpin(k)

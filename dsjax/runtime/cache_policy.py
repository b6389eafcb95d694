"""Slot caches with an eviction policy that weighs recency and frequency (LRFU), and their counters.

A `SlotCache` maps keys (expert ids, or (layer, expert) pairs) to a fixed number of slots. Each key carries a
combined recency-frequency value C = sum over past uses of 2^(-decay * age): decay 0 is LFU, decay 1 behaves like
LRU, values between blend them (Lee et al., "LRFU", IEEE TC 2001). The victim is the unpinned key with the smallest
C now. Pinned keys (in use by a computation or a copy in flight) are never evicted. Pure bookkeeping: the caller
moves the bytes into the slot it is given.
"""

from __future__ import annotations

import dataclasses
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
        self._last: dict[Hashable, int] = {}
        self._pins: dict[Hashable, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self._clock = 0

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
        return self._crf[key] * 2.0 ** (-self.decay * (self._clock - self._last[key]))

    def _touch(self, key: Hashable) -> None:
        self._crf[key] = (self._value(key) if key in self._crf else 0.0) + 1.0
        self._last[key] = self._clock

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
            candidates = [k for k in self._slot if not self._pins.get(k)]
            if not candidates:
                raise RuntimeError(f"all {self.capacity} slots are pinned; the cache is too small for the work in "
                                   "flight (raise its budget or lower prefetch depth)")
            evicted = min(candidates, key=lambda k: (self._value(k), self._last[k]))
            slot = self._slot.pop(evicted)
            self._crf.pop(evicted)
            self._last.pop(evicted)
            self.counters.evictions += 1
        self._slot[key] = slot
        self._touch(key)
        if pin:
            self.pin(key)
        return slot, evicted

    def evict_one(self) -> Hashable:
        """Evict the lowest-valued unpinned key now and return it (RuntimeError if all are pinned)."""
        candidates = [k for k in self._slot if not self._pins.get(k)]
        if not candidates:
            raise RuntimeError(f"all {self.capacity} slots are pinned")
        victim = min(candidates, key=lambda k: (self._value(k), self._last[k]))
        self._free.append(self._slot.pop(victim))
        self._crf.pop(victim)
        self._last.pop(victim)
        self.counters.evictions += 1
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

    def unpin_all(self, keys: Iterable[Hashable]) -> None:
        for k in keys:
            self.unpin(k)

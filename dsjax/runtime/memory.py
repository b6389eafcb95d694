"""MemoryManager: the budget of every pool in every tier, and the ledger of each buffer handed out.

Pools are the seed's split (planner.Pools). A request that would exceed its pool is refused with an error naming the
pool, what it holds and what was asked; `report()` says what sits where. The manager accounts; it never allocates:
the movers allocate, after the manager said yes.
"""

from __future__ import annotations

import dataclasses
import threading

from dsjax.runtime.planner import BudgetError, Pools, fmt_bytes

GPU_POOLS = ("reserve", "active_layers", "expert_cache", "compute")
HOST_POOLS = ("host_weights", "host_layer_cache", "host_prefetch", "host_reserve")


@dataclasses.dataclass
class PoolUse:
    capacity: int
    used: int = 0
    items: int = 0


class MemoryManager:
    """Example:
        >>> mm = MemoryManager(Pools.split(16 * 10**9, 96 * 10**9))
        >>> mm.reserve("expert_cache", ("expert", 3, 17), 24_772_608)
        >>> mm.report()["expert_cache"]
    """

    def __init__(self, pools: Pools, capacities: dict[str, int] | None = None):
        caps = dataclasses.asdict(pools)
        caps.update(capacities or {})
        self._pools = {name: PoolUse(int(cap)) for name, cap in caps.items()}
        self._ledger: dict[object, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def reserve(self, pool: str, key: object, nbytes: int) -> None:
        """Account `nbytes` for buffer `key` in `pool`, or raise BudgetError naming the pool."""
        with self._lock:
            if pool not in self._pools:
                raise KeyError(f"unknown pool {pool!r}; pools: {', '.join(self._pools)}")
            if key in self._ledger:
                raise ValueError(f"buffer {key!r} is already accounted in pool {self._ledger[key][0]!r}")
            p = self._pools[pool]
            if p.used + nbytes > p.capacity:
                raise BudgetError(f"pool {pool!r} cannot take {fmt_bytes(nbytes)} for {key!r}: it holds "
                                  f"{fmt_bytes(p.used)} of {fmt_bytes(p.capacity)} in {p.items} buffers; raise the "
                                  "budget or lower what uses this pool")
            p.used += nbytes
            p.items += 1
            self._ledger[key] = (pool, nbytes)

    def reserve_first(self, pools: tuple[str, ...], key: object, nbytes: int) -> str:
        """Account `key` in the first of `pools` with room (e.g. host model weights, then the host layer cache)."""
        for pool in pools[:-1]:
            if self.free(pool) >= nbytes:
                self.reserve(pool, key, nbytes)
                return pool
        self.reserve(pools[-1], key, nbytes)
        return pools[-1]

    def release(self, key: object) -> None:
        with self._lock:
            pool, nbytes = self._ledger.pop(key)
            p = self._pools[pool]
            p.used -= nbytes
            p.items -= 1

    def holds(self, key: object) -> bool:
        return key in self._ledger

    def free(self, pool: str) -> int:
        p = self._pools[pool]
        return p.capacity - p.used

    def report(self) -> dict[str, dict[str, int]]:
        """{pool: {capacity, used, items}} for every pool of both tiers."""
        with self._lock:
            return {name: dataclasses.asdict(p) for name, p in self._pools.items()}

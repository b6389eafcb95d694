"""MemoryManager: the budget of every pool in every tier, and the ledger of each buffer handed out.

Pools are the seed's split (planner.Pools). A request that would exceed its pool is refused with an error naming the
pool, what it holds and what was asked; `report()` says what sits where. The manager accounts; it never allocates:
the movers allocate, after the manager said yes.
"""

from __future__ import annotations

import dataclasses
import os
import threading

from dsjax.runtime.planner import (GIB, JAX_MEM_FRACTION, SUGGESTED_MEM_FRACTION, BudgetError, Pools, fmt_bytes,
                                   pinned_cap_gib)

GPU_POOLS = ("reserve", "active_layers", "expert_cache", "compute")
HOST_POOLS = ("host_weights", "host_layer_cache", "host_prefetch", "host_reserve")


def host_available(meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes of RAM new allocations can take now without swapping (the kernel's MemAvailable), or None where the
    system does not say (not Linux, an unreadable file)."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024          # the kernel writes it in kB (KiB)
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_room(need: int, available: int | None, host_memory: int | None = None) -> None:
    """Refuse, before anything is pinned, an engine whose plan pins more host memory than the machine has free: the
    GPU runtime's pinned allocations past free RAM end the process (an abort, no Python error) or swap. `need`: the
    plan's pinned host bytes, a lower bound of what the load takes (on the V3 slice the process's RSS has been ~2.2x
    its pinned experts, not broken down: bench/RESULTS.md), so only the gross cases are caught; `available`:
    host_available() (None: unknown, no check)."""
    if available is None or need <= available:
        return
    budget = "no host_memory limit" if host_memory is None else f"host_memory={fmt_bytes(host_memory)}"
    fit = available * 9 // 10 // 10**9
    raise BudgetError(
        f"the plan pins {fmt_bytes(need)} of host memory ({budget}) but this machine has {fmt_bytes(available)} "
        "available now (MemAvailable, /proc/meminfo): another process holds the rest (an engine or `dsjax serve` "
        f"still running or shutting down?). Stop it, or pass a host budget that fits (host_memory='{fit}GB', "
        f"--host-memory {fit}GB): the plan then leaves more experts on disk")


PINNED_LIMIT_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_MARK_ENV = "DSJAX_PINNED_LIMIT_GB"        # the limit's value when dsjax set it (dsjax/__init__.py)


def cap_pinned_host(need: int | None, environ=None, initialized: bool | None = None) -> int | None:
    """Cap JAX's pinned host pool near what the first engine's plan pins (`need` bytes); returns the cap set, in GiB,
    or None where nothing changed.

    XLA's GPU client allocates pinned host memory from a BFC pool that grows in regions of doubling size, each resident
    in full, up to XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB; `import dsjax` lifts that limit to 90% of RAM (PJRT's own 64 GiB
    default fails loads on big hosts). So a plan pinning 37 GiB leaves ~64 GiB pinned (the V3 slice: RSS ~2.2x its
    pinned experts, bench/RESULTS.md), and one pinning 70 GiB on a 128 GB machine can take 115 GiB. With the cap at the
    plan's need + 10% + 2 GiB the pool stops there. Only while JAX has not started its backends (the variable is read
    once, when the GPU client starts), and only over dsjax's own default: a limit the user set is left alone
    (dsjax.PINNED_LIMIT_SET_BY_DSJAX). No effect on other backends, which never read it."""
    import dsjax
    environ = os.environ if environ is None else environ
    if initialized is None:
        from jax._src import xla_bridge
        initialized = xla_bridge.backends_are_initialized()
    if need is None or initialized or not dsjax.PINNED_LIMIT_SET_BY_DSJAX:
        return None
    try:
        current = int(environ[PINNED_LIMIT_ENV])
    except (KeyError, ValueError):
        return None
    cap = pinned_cap_gib(need)
    if cap >= current:
        return None
    environ[PINNED_LIMIT_ENV] = environ[PINNED_MARK_ENV] = str(cap)        # the mark: dsjax's value, not the user's
    return cap


def check_pinned_cap(need: int, environ=None) -> None:
    """Refuse, before anything is pinned, a plan pinning more than the pinned pool's limit: a later engine of the same
    process whose host budget outgrew the cap an earlier one set (or a limit the user set too low) would fail with
    RESOURCE_EXHAUSTED halfway through its load. Only what cannot fit is refused: a later engine of about the first's
    size (another preset, say) may use the first's margin. GPU only."""
    environ = os.environ if environ is None else environ
    try:
        limit = int(environ[PINNED_LIMIT_ENV])
    except (KeyError, ValueError):
        return
    if need <= limit * GIB:
        return
    raise BudgetError(
        f"the plan pins {fmt_bytes(need)} of host memory, but this process's pinned pool is capped at {limit} GiB "
        f"({PINNED_LIMIT_ENV}, read once when JAX's GPU client started; dsjax sets it from the first engine's plan). "
        f"Load this engine in a new process, or set {PINNED_LIMIT_ENV}={pinned_cap_gib(need)} (or more) in the "
        "environment before JAX starts, or pass a smaller host budget")


def check_gpu_room(gpu_memory: int | None, stats: dict | None, device: str = "the GPU") -> None:
    """Refuse, before anything is placed, a GPU budget larger than JAX's allocator will give this process: past it
    the load fails halfway with XLA's RESOURCE_EXHAUSTED. JAX's GPU allocator gives a process a fraction of the card,
    75% unless XLA_PYTHON_CLIENT_MEM_FRACTION (or XLA_CLIENT_MEM_FRACTION) says otherwise, set before JAX starts,
    preallocated or not (jax 0.11.2 on an H100: 59.4 of 79.2 GiB, bench/RESULTS.md run 12): on a 16 GB card a 12 GB
    limit, so `--gpu-memory 16GB` cannot fit under it. `gpu_memory`: the budget (None: no limit, no check); `stats`: the
    device's memory_stats() (None where the backend keeps none, e.g. the CPU: no check)."""
    if gpu_memory is None or not stats or "bytes_limit" not in stats:
        return
    limit, in_use = int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
    free = limit - in_use
    if gpu_memory <= free:
        return
    fit = max(free, 0) * 95 // 100 // 10**8 / 10          # GB, one decimal, rounded down, a margin for XLA's own
    raise BudgetError(
        f"gpu_memory={fmt_bytes(gpu_memory)} is more than JAX's GPU allocator gives this process on {device}: "
        f"{fmt_bytes(free)} ({fmt_bytes(limit)} limit, {fmt_bytes(in_use)} in use). JAX gives a process a fraction "
        f"of the card, {JAX_MEM_FRACTION:.0%} unless told otherwise: start the process with "
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={SUGGESTED_MEM_FRACTION} in its environment (before JAX starts; dsjax's "
        "budget still bounds what it uses), or pass a budget that fits "
        f"(gpu_memory='{fit}GB', --gpu-memory {fit}GB)")


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

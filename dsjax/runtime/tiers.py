"""The movers: DiskReader (NVMe -> host), HostCache (pinned host experts), ExpertCache (GPU expert slots) and
LayerManager (GPU ring for layer weights that are not resident).

They execute what the planner decided and keep counters; the policy of what to fetch when lives in the engine and
the PrefetchSystem. Every buffer they hold is accounted in the MemoryManager. Copies are asynchronous: a
`jax.device_put` returns at once and the computation that consumes the array waits for it on the device.

On the expert path (disk -> pinned host -> GPU slots) a routed expert is one flat uint8 buffer (expert_layout.py):
the reader packs it, the host cache pins it, it crosses to the GPU as one copy, and the slot write unflattens it
into the pool's parts.
"""

# P GPU expert slots, k experts of one read or load, B bytes of one expert buffer (ExpertLayout.nbytes)

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.runtime.cache_policy import SlotCache
from dsjax.runtime.expert_layout import ExpertLayout, flatten, unflatten
from dsjax.runtime.memory import MemoryManager
from dsjax.runtime.metrics import Metrics


def tree_nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def shardings(device):
    """(device memory, pinned host memory) of `device`: every pool and cache is given its device."""
    return (jax.sharding.SingleDeviceSharding(device, memory_kind="device"),
            jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"))


class Residency:
    """Which (layer, expert) keys a cache holds, as one boolean row per layer: the policy reads a layer's row at
    once instead of looking experts up one by one."""

    def __init__(self):
        self._rows: dict[int, np.ndarray] = {}

    def row(self, layer: int, n: int) -> np.ndarray:
        r = self._rows.get(layer)
        if r is None:
            return np.zeros(n, bool)
        return r[:n] if r.size >= n else np.concatenate([r, np.zeros(n - r.size, bool)])

    def set(self, key, value: bool) -> None:
        if not (isinstance(key, tuple) and len(key) == 2):
            return                                   # only (layer, expert) keys have rows
        layer, e = key
        r = self._rows.get(layer)
        if r is None or r.size <= e:
            grown = np.zeros(max(e + 1, 2 * (0 if r is None else r.size), 64), bool)
            if r is not None:
                grown[:r.size] = r
            self._rows[layer] = r = grown
        r[e] = value

    def clear(self) -> None:
        self._rows.clear()


class DiskReader:
    """Reads routed experts from the store on loader threads and packs each into its flat buffer (numpy uint8 [B],
    see `layout`). At most `max_inflight` layer reads run at once."""

    def __init__(self, store, metrics: Metrics, layout: ExpertLayout, max_inflight: int = 4):
        self.store = store
        self.metrics = metrics
        self.layout = layout
        self._pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="dsjax-disk")

    def read(self, layer: int, experts: list[int], stage: Callable[[tuple[int, int], Any], Any] | None = None
             ) -> Future:
        """Future of {expert: buffer} for `experts` of `layer`; `stage((layer, e), buffer)` runs on the loader thread
        (the host cache's pinned staging copy) and its result replaces the numpy buffer."""
        return self._pool.submit(self._read, layer, list(experts), stage)

    def _read(self, layer: int, experts: list[int], stage=None) -> dict[int, Any]:
        t0 = time.perf_counter()
        futs = self.store.read_experts(layer, experts)
        parts = {proj: f.result() for proj, f in futs.items()}
        rows = flatten(parts, self.layout)                                  # [k, B]
        nbytes = sum(a.nbytes for p in parts.values() for a in p.values())
        self.metrics.add_transfer("disk->host", nbytes, time.perf_counter() - t0)
        out = {e: rows[j] for j, e in enumerate(experts)}
        if stage is not None:
            out = {e: stage((layer, e), row) for e, row in out.items()}
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class HostCache:
    """Pinned-host copies of routed experts (one flat buffer each), keyed (layer, expert), LRFU eviction, accounted in
    the host pools at `expert_bytes` (the buffer's size) each."""

    def __init__(self, capacity: int, mm: MemoryManager, metrics: Metrics, expert_bytes: int, decay: float = 0.1, *,
                 device):
        self.slots = SlotCache(capacity, decay)
        self.mm = mm
        self.metrics = metrics
        self.expert_bytes = expert_bytes
        self._data: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()
        self._s_host = shardings(device)[1]
        self._resident = Residency()

    def resident(self, layer: int, n: int) -> np.ndarray:
        """[n] bool: which experts of `layer` the cache holds now (a loader thread may change it just after)."""
        with self._lock:
            return self._resident.row(layer, n).copy()

    def get(self, key: tuple[int, int], count: bool = True):
        with self._lock:
            hit = (self.slots.lookup(key) if count else self.slots.peek(key)) is not None
            return self._data[key] if hit else None

    def put(self, key: tuple[int, int], row: np.ndarray) -> jax.Array:
        """Stage an expert's numpy buffer into pinned host memory (on the calling loader thread) and cache it if there
        is room; returns the pinned buffer either way."""
        t0 = time.perf_counter()
        pinned = jax.device_put(row, self._s_host)
        jax.block_until_ready(pinned)
        self.metrics.add_transfer("stage->pinned", self.expert_bytes, time.perf_counter() - t0)
        with self._lock:
            if self.slots.capacity == 0 or key in self.slots:
                return pinned
            if len(self.slots) == self.slots.capacity:      # make room first, so a refusal leaves no trace
                victim = self.slots.evict_one()
                self._data.pop(victim)
                self._resident.set(victim, False)
                self.mm.release(("host_expert", *victim))
            self.mm.reserve_first(("host_layer_cache", "host_weights"), ("host_expert", *key), self.expert_bytes)
            self.slots.insert(key)
            self._data[key] = pinned
            self._resident.set(key, True)
        return pinned

    def tick(self) -> None:
        with self._lock:
            self.slots.tick()


WRITE_GROUP = 16       # experts per slot write (the largest bucket compiled)


def pow2_bucket(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): counts and batch sizes bucketed so that few executables compile."""
    return 1 << (max(n, 1) - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnums=(0,))
def _write_slots(pool, slots, rows, layout: ExpertLayout):
    """pool[slots[j]] = the expert in flat buffer rows[j], every part (one executable per bucketed count). The pool
    is donated and each expert's parts are written in place (a scatter of the stacked rows would first build an
    [n, B] copy of them, which no budget accounts for)."""
    for j, row in enumerate(rows):
        one = unflatten(row, layout)
        pool = jax.tree.map(lambda p, v: jax.lax.dynamic_update_slice(
            p, v[None].astype(p.dtype), (slots[j],) + (0,) * (p.ndim - 1)), pool, one)
    return pool


@functools.partial(jax.jit, static_argnames=("layout", "s_dev"), donate_argnums=(0,))
def _copy_write_slots(pool, slots, rows, layout: ExpertLayout, s_dev):
    """_write_slots with the host->GPU copies inside: `rows` are pinned host buffers, copied by the executable."""
    return _write_slots(pool, slots, tuple(jax.device_put(r, s_dev) for r in rows), layout)


class ExpertCache:
    """GPU expert slots shared by all MoE layers: one device array per projection part with P slots on axis 0 (the
    kernels read the parts in place), LRFU over (layer, expert) keys.

    An expert crosses host->GPU as one flat buffer (`layout`); `load` issues the copies at once and returns the
    slots; the copied buffers are unflattened into the pool only by `flush`, which the runtime calls right before a
    computation reads the pool. So a computation dispatched between the two (the next layer's attention) never waits
    for copies it does not need, and the copies run under it; all the copies of one layer, predicted and missed, land
    in one slot write."""

    def __init__(self, capacity: int, layout: ExpertLayout, mm: MemoryManager, metrics: Metrics, decay: float = 0.1, *,
                 device):
        s_dev, self._s_host = shardings(device)
        self.slots = SlotCache(capacity, decay)
        self.metrics = metrics
        self.layout = layout
        self.expert_bytes = layout.nbytes
        self._decay = decay
        mm.reserve("expert_cache", "gpu_expert_slots", capacity * layout.nbytes)
        self._template = jax.eval_shape(lambda: unflatten(jnp.zeros((capacity, layout.nbytes), jnp.uint8), layout))
        self._s_dev = s_dev
        self.pool = self._empty_pool()
        self._pending: dict[int, Any] = {}      # slot -> its expert's buffer on the GPU (copy issued), not yet written
        self._resident = Residency()
        self.hot: set = set()                    # keys pinned for the cache's life (memory_config.hot_experts)
        self.copied_in_write = 0                 # experts copied by write_now (compute_config.expert_copy = "jit")

    def resident(self, layer: int, n: int) -> np.ndarray:
        """[n] bool: which experts of `layer` have a slot (copied, or copy issued)."""
        return self._resident.row(layer, n)

    def _empty_pool(self):
        return jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), self._s_dev), self._template)

    def recover(self) -> bool:
        """After a failed step: no expert stays pinned or half-copied but the hot set; a pool consumed by a failed
        (donating) call is rebuilt empty and every slot forgotten, the hot set's too. True when the hot set is still
        resident (its pins kept), False when it must be loaded again."""
        self.slots.clear_pins()
        broken = any(a.is_deleted() for a in jax.tree.leaves(self.pool))
        if not broken:
            try:     # copies issued before the failure (ahead of their layer) are written: a slot that names an
                self.flush()    # expert must hold it, or a later hit computes with the slot's previous expert
            except Exception:
                broken = True
        self._pending = {}
        if broken:
            self.pool = self._empty_pool()
            counters = self.slots.counters
            self.slots = SlotCache(self.slots.capacity, self._decay)
            self.slots.counters = counters
            self._resident.clear()
            return not self.hot
        for key in self.hot:                    # copied by a flush that ran: in the pool, pinned again
            self.slots.pin(key)
        return True

    def load_hot(self, items: list[tuple[Any, Any]]) -> None:
        """Copy the hot set [(key, buffer)] into slots, pinned for the cache's life (the per-step unpins balance their
        own pins; recover re-pins it), and write them into the pool."""
        self.hot = {key for key, _ in items}
        todo = [(k, row) for k, row in items if k not in self.slots]
        for key, _ in items:
            if key in self.slots:
                self.slots.pin(key)
        self.load(todo, pin=True)
        self.flush()

    def lookup(self, key, count: bool = True) -> int | None:
        return self.slots.lookup(key) if count else self.slots.peek(key)

    def _claim(self, items: list[tuple[Any, Any]], pin: bool) -> list[int]:
        """Slots for the keys of `items` (LRFU evicts where needed), marked resident."""
        slots = []
        for key, _ in items:
            slot, evicted = self.slots.insert(key, pin=pin)
            if evicted is not None:
                self._resident.set(evicted, False)
            self._resident.set(key, True)
            slots.append(slot)
        return slots

    def load(self, items: list[tuple[Any, Any]], pin: bool = False) -> list[int]:
        """Start copying experts [(key, pinned-host or numpy buffer [B])] into slots: one list put (every copy in
        flight at once, which a lone expert copy cannot fill the link with); asynchronous; written by `flush`."""
        if not items:
            return []
        slots = self._claim(items, pin)
        t0 = time.perf_counter()
        devs = jax.device_put([row for _, row in items], self._s_dev)
        self._pending.update(zip(slots, devs))   # a slot re-filled before a flush keeps only its latest expert
        self.metrics.add_transfer("host->GPU", self.expert_bytes * len(items), time.perf_counter() - t0,
                                  issued_only=True)
        return slots

    def write_now(self, items: list[tuple[Any, Any]], pin: bool = False) -> list[int]:
        """Copy experts [(key, pinned-host buffer)] into slots and write them into the pool now, the copies inside the
        slot write's executable (compute_config.expert_copy = "jit"): one dispatch per WRITE_GROUP experts instead of
        a put per expert and a write. For copies needed at once (a layer's misses, issued right after its routing
        read-back, when the GPU has nothing else queued): the executable's copies start only when the stream reaches
        it, so copies ahead of their layer go through `load`, whose puts run beside the queued compute."""
        if not items:
            return []
        slots = self._claim(items, pin)
        for slot in slots:
            self._pending.pop(slot, None)          # an older copy into this slot must not overwrite it at the flush
        t0 = time.perf_counter()
        rows = [row for _, row in items]
        for g in range(0, len(slots), WRITE_GROUP):
            s, r = slots[g:g + WRITE_GROUP], rows[g:g + WRITE_GROUP]
            n = pow2_bucket(len(s))
            self.pool = _copy_write_slots(self.pool, np.asarray(s + [s[-1]] * (n - len(s)), np.int32),
                                          tuple(r + [r[-1]] * (n - len(r))), self.layout, self._s_dev)
        self.copied_in_write += len(items)
        self.metrics.add_transfer("host->GPU", self.expert_bytes * len(items), time.perf_counter() - t0,
                                  issued_only=True)
        return slots

    def compile_writes(self, copy_in_write: bool = False) -> None:
        """Compile (not run) the slot write of every count bucket a flush can use, so none compiles mid-step (and,
        with `copy_in_write`, write_now's)."""
        row = jax.device_put(np.zeros(self.layout.nbytes, np.uint8), self._s_dev)
        host_row = jax.device_put(np.zeros(self.layout.nbytes, np.uint8), self._s_host)
        n = 1
        while n <= min(pow2_bucket(self.slots.capacity), WRITE_GROUP):
            _write_slots.lower(self.pool, jnp.zeros(n, jnp.int32), (row,) * n, self.layout).compile()
            if copy_in_write:
                _copy_write_slots.lower(self.pool, jnp.zeros(n, jnp.int32), (host_row,) * n, self.layout,
                                        self._s_dev).compile()
            n *= 2

    def flush(self) -> Any:
        """Write every copied expert into its slot and return the pool: writes of at most WRITE_GROUP experts, one
        executable per bucketed count (each unrolls its experts' in-place updates: compile time grows with the
        count, so the buckets stop at WRITE_GROUP); the pool is donated."""
        items = list(self._pending.items())
        self._pending = {}
        for g in range(0, len(items), WRITE_GROUP):
            slots, devs = (list(t) for t in zip(*items[g:g + WRITE_GROUP]))
            n = pow2_bucket(len(slots))                       # bucket the count: few executables
            idx = slots + [slots[-1]] * (n - len(slots))        # padding rewrites the last slot with the same value
            # the indices as numpy: the call converts them (jnp.asarray would be an eager program per count)
            self.pool = _write_slots(self.pool, np.asarray(idx, np.int32),
                                     tuple(devs + [devs[-1]] * (n - len(slots))), self.layout)
        return self.pool

    def tick(self) -> None:
        self.slots.tick()


class LayerManager:
    """Layer weights that are not resident on the GPU stream through a ring of `ring_slots` GPU copies.

    `get(i)` returns layer i's weights on the GPU: resident ones directly, streamed ones from the copy issued by
    `prefetch` (or now, on demand). Host copies are pinned (or read from the store when the host tier has no room).
    """

    def __init__(self, resident: dict[int, Any], host: dict[int, Any], load_from_disk: Callable[[int], Any],
                 ring_slots: int, mm: MemoryManager, metrics: Metrics, layer_bytes: dict[int, int], *, device):
        self.resident = resident
        self.host = host
        self.load_from_disk = load_from_disk
        self.ring_slots = ring_slots
        self.mm = mm
        self.metrics = metrics
        self.layer_bytes = layer_bytes
        self.inflight: dict[int, Any] = {}
        self.s_dev, _ = shardings(device)
        self.counters = {"resident_gets": 0, "prefetched": 0, "on_demand": 0}
        self.max_inflight = 0

    def _issue(self, i: int) -> Any:
        t0 = time.perf_counter()
        src = self.host.get(i)
        if src is None:
            src = self.load_from_disk(i)
        dev = jax.device_put(src, self.s_dev)
        self.mm.reserve("active_layers", ("ring", i), self.layer_bytes[i])
        self.metrics.add_transfer("host->GPU", self.layer_bytes[i], time.perf_counter() - t0, issued_only=True)
        return dev

    def prefetch(self, i: int) -> None:
        if i in self.resident or i in self.inflight or i not in self.layer_bytes:
            return
        if len(self.inflight) >= self.ring_slots:
            return
        self.inflight[i] = self._issue(i)
        self.max_inflight = max(self.max_inflight, len(self.inflight))

    def get(self, i: int) -> Any:
        if i in self.resident:
            self.counters["resident_gets"] += 1
            return self.resident[i]
        if i in self.inflight:
            self.counters["prefetched"] += 1
            return self.inflight[i]
        self.counters["on_demand"] += 1
        while len(self.inflight) >= self.ring_slots:
            self.release(next(iter(self.inflight)))
        self.inflight[i] = self._issue(i)
        self.max_inflight = max(self.max_inflight, len(self.inflight))
        return self.inflight[i]

    def release(self, i: int) -> None:
        if self.inflight.pop(i, None) is not None:
            self.mm.release(("ring", i))

    def release_all(self) -> None:
        for i in list(self.inflight):
            self.release(i)

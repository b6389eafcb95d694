"""Runtime bookkeeping on the CPU: the LRFU slot cache against independent LRU/LFU simulations, pinning, counters,
and the MemoryManager's ledger and refusals."""

import collections

import numpy as np
import pytest

from dsjax.runtime.cache_policy import SlotCache
from dsjax.runtime.memory import MemoryManager
from dsjax.runtime.planner import BudgetError, Pools


def _run(cache, seq):
    """Access keys one per tick; return the sequence of (hit?, evicted key)."""
    out = []
    for k in seq:
        cache.tick()
        if cache.lookup(k) is not None:
            out.append((True, None))
        else:
            out.append((False, cache.insert(k)[1]))
    return out


def test_decay_one_is_lru():
    seq = np.random.default_rng(0).integers(0, 12, 400).tolist()
    got = _run(SlotCache(5, decay=1.0), seq)
    lru, want = collections.OrderedDict(), []
    for k in seq:
        if k in lru:
            lru.move_to_end(k)
            want.append((True, None))
        else:
            ev = lru.popitem(last=False)[0] if len(lru) == 5 else None
            lru[k] = True
            want.append((False, ev))
    assert got == want


def test_decay_zero_is_lfu_with_oldest_tiebreak():
    seq = np.random.default_rng(1).zipf(1.5, 400) % 15
    got = _run(SlotCache(4, decay=0.0), seq.tolist())
    count, last, cached, want = collections.Counter(), {}, set(), []
    for t, k in enumerate(seq.tolist()):
        if k in cached:
            count[k] += 1
            last[k] = t
            want.append((True, None))
            continue
        ev = None
        if len(cached) == 4:
            ev = min(cached, key=lambda c: (count[c], last[c]))
            cached.remove(ev)
            del count[ev]
        cached.add(k)
        count[k] += 1
        last[k] = t
        want.append((False, ev))
    assert got == want


def test_frequency_protects_hot_keys_under_blended_decay():
    """A key used every other step survives a scan of one-off keys that would flush it from a plain LRU of 3."""
    c = SlotCache(3, decay=0.05)
    for i in range(20):
        c.tick()
        if c.lookup("hot") is None:
            c.insert("hot")
        c.tick()
        if c.lookup(f"cold{i}") is None:
            c.insert(f"cold{i}")
    for i in range(3):  # a burst of 3 new keys, no use of hot in between
        c.tick()
        c.insert(f"scan{i}")
    assert "hot" in c


def test_pinned_keys_are_never_evicted_and_counters():
    c = SlotCache(2, decay=1.0)
    c.insert("a", pin=True)
    c.tick()
    c.insert("b")
    c.tick()
    _, ev = c.insert("c")          # a is the least recent but pinned
    assert ev == "b" and "a" in c
    c.pin("c")
    with pytest.raises(RuntimeError, match="pinned"):
        c.insert("d")
    c.unpin("a")
    assert c.insert("d")[1] == "a"
    assert c.lookup("zzz") is None and c.lookup("d") is not None
    assert (c.counters.hits, c.counters.misses, c.counters.evictions) == (1, 1, 2)
    with pytest.raises(ValueError, match="not pinned"):
        c.unpin("d")


def test_slots_are_reused_and_unique():
    c = SlotCache(4, decay=0.5)
    rng = np.random.default_rng(2)
    for k in rng.integers(0, 9, 200).tolist():
        c.tick()
        if c.lookup(k) is None:
            c.insert(k)
        slots = [c.peek(x) for x in c.keys()]
        assert len(set(slots)) == len(slots) and set(slots) <= set(range(4))


def test_memory_manager_ledger_and_refusal():
    mm = MemoryManager(Pools.split(16 * 10**9, 96 * 10**9))
    assert mm.report()["expert_cache"]["capacity"] == 4 * 10**9
    mm.reserve("expert_cache", ("e", 3, 1), 3 * 10**9)
    with pytest.raises(BudgetError, match=r"pool 'expert_cache' cannot take 2.00 GB .* holds 3.00 GB of 4.00 GB"):
        mm.reserve("expert_cache", ("e", 3, 2), 2 * 10**9)
    mm.release(("e", 3, 1))
    mm.reserve("expert_cache", ("e", 3, 2), 2 * 10**9)
    assert mm.report()["expert_cache"] == {"capacity": 4 * 10**9, "used": 2 * 10**9, "items": 1}
    with pytest.raises(ValueError, match="already accounted"):
        mm.reserve("compute", ("e", 3, 2), 1)
    with pytest.raises(KeyError, match="unknown pool"):
        mm.reserve("swap", "x", 1)

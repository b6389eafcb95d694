"""Runtime bookkeeping on the CPU: the LRFU slot cache against independent LRU/LFU simulations, pinning, counters,
and the MemoryManager's ledger and refusals; the GPU expert cache's deferred slot writes."""

import collections
import dataclasses

import jax
import numpy as np
import pytest

from dsjax.runtime.cache_policy import SlotCache
from dsjax.runtime.memory import MemoryManager, check_host_room, host_available
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


@pytest.mark.parametrize("decay", [0.1, 0.5])
def test_lrfu_victims_match_the_definition(decay):
    """Against LRFU computed from its definition (C = sum over a key's uses since it was cached of 2^(-decay * age);
    victim: smallest C among unpinned keys, then oldest last use, then cached first), over random uses, pins and
    evictions: the same victims and slots (the cache ranks keys with a heap instead of scanning them)."""
    rng = np.random.default_rng(int(decay * 10))
    cache = SlotCache(6, decay=decay)
    uses, slot_of, order, pins, free, clock = {}, {}, [], collections.Counter(), list(range(5, -1, -1)), 0

    def value(k):
        return sum(2.0 ** (-decay * (clock - t)) for t in uses[k])

    def victim():
        cands = [k for k in order if not pins[k]]
        return min(cands, key=lambda k: (value(k), uses[k][-1], order.index(k))) if cands else None

    for _ in range(3000):
        op = rng.random()
        k = int(rng.zipf(1.3)) % 20
        if op < 0.15:
            cache.tick()
            clock += 1
        elif op < 0.25 and order:
            p = order[int(rng.integers(len(order)))]
            if pins[p] and rng.random() < 0.6:
                cache.unpin(p)
                pins[p] -= 1
            elif pins[p] < 2:
                cache.pin(p)
                pins[p] += 1
        elif op < 0.3 and order:
            want = victim()
            if want is None:
                with pytest.raises(RuntimeError):
                    cache.evict_one()
                continue
            assert cache.evict_one() == want
            free.append(slot_of.pop(want))
            order.remove(want)
            del uses[want]
        elif k in slot_of:
            assert cache.lookup(k) == slot_of[k]
            uses[k].append(clock)
        else:
            assert cache.lookup(k) is None
            want = None if free else victim()
            if not free and want is None:
                with pytest.raises(RuntimeError):
                    cache.insert(k)
                continue
            slot, evicted = cache.insert(k)
            assert evicted == want
            if want is not None:
                assert slot == slot_of.pop(want)
                order.remove(want)
                del uses[want]
            else:
                assert slot == free.pop()
            slot_of[k], uses[k] = slot, [clock]
            order.append(k)
    assert cache.counters.evictions > 100


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


def test_expert_copies_reach_the_pool_only_at_flush_and_the_latest_copy_of_a_slot_wins():
    """ExpertCache.load only issues copies; flush writes them in one slot write. A slot whose expert was evicted and
    replaced before the flush ends with the replacement (a scatter with a repeated index would pick either)."""
    from dsjax.runtime.expert_layout import ExpertLayout, Part, flatten
    from dsjax.runtime.metrics import Metrics
    from dsjax.runtime.tiers import ExpertCache
    layout = ExpertLayout((Part("down", "weight", 0, (4,), "float32"),), (("down", None),), 256)
    pools = Pools(**{f.name: 1 << 20 for f in dataclasses.fields(Pools)})
    cache = ExpertCache(2, layout, MemoryManager(pools), Metrics(), device=jax.devices()[0])
    expert = lambda v: flatten({"down": {"weight": np.full((1, 4), v, np.float32)}}, layout)[0]  # noqa: E731
    cache.load([(("L", 0), expert(1.0)), (("L", 1), expert(2.0))])
    assert not np.asarray(cache.pool["down"]).any(), "written before flush"
    slot0 = cache.lookup(("L", 0))
    cache.slots.pin(("L", 1))
    cache.load([(("L", 2), expert(3.0))])                   # evicts expert 0 (the only unpinned one) into its slot
    assert cache.lookup(("L", 2)) == slot0 and cache.lookup(("L", 0), count=False) is None
    pool = np.asarray(cache.flush()["down"])
    np.testing.assert_array_equal(pool[slot0], 3.0)
    np.testing.assert_array_equal(pool[cache.lookup(("L", 1))], 2.0)
    assert cache.flush() is cache.pool                      # nothing pending: no new write


def test_a_flush_of_more_experts_than_one_write_group_writes_them_all():
    from dsjax.runtime.expert_layout import ExpertLayout, Part, flatten
    from dsjax.runtime.metrics import Metrics
    from dsjax.runtime.tiers import WRITE_GROUP, ExpertCache
    layout = ExpertLayout((Part("down", "weight", 0, (4,), "float32"),), (("down", None),), 256)
    pools = Pools(**{f.name: 1 << 20 for f in dataclasses.fields(Pools)})
    n = 2 * WRITE_GROUP + 5
    cache = ExpertCache(n + 3, layout, MemoryManager(pools), Metrics(), device=jax.devices()[0])
    rows = flatten({"down": {"weight": np.arange(n, dtype=np.float32)[:, None].repeat(4, 1) + 1}}, layout)
    slots = cache.load([(("L", e), rows[e]) for e in range(n)])
    pool = np.asarray(cache.flush()["down"])
    np.testing.assert_array_equal(pool[slots], np.arange(n, dtype=np.float32)[:, None].repeat(4, 1) + 1)
    assert not pool[sorted(set(range(n + 3)) - set(slots))].any()


def test_write_now_copies_pinned_experts_into_their_slots_at_once_and_beats_an_older_pending_copy():
    """compute_config.expert_copy = "jit": ExpertCache.write_now copies pinned host buffers inside the slot write
    (the pool holds them on return, more than one write group included), and a copy issued earlier into a slot that
    write_now re-fills is not written over it by the next flush."""
    from dsjax.runtime.expert_layout import ExpertLayout, Part, flatten
    from dsjax.runtime.metrics import Metrics
    from dsjax.runtime.tiers import WRITE_GROUP, ExpertCache, shardings
    layout = ExpertLayout((Part("down", "weight", 0, (4,), "float32"),), (("down", None),), 256)
    pools = Pools(**{f.name: 1 << 20 for f in dataclasses.fields(Pools)})
    dev = jax.devices()[0]
    pinned = lambda row: jax.device_put(row, shardings(dev)[1])  # noqa: E731
    expert = lambda v: pinned(flatten({"down": {"weight": np.full((1, 4), v, np.float32)}}, layout)[0])  # noqa: E731
    n = WRITE_GROUP + 3
    cache = ExpertCache(n + 2, layout, MemoryManager(pools), Metrics(), device=dev)
    cache.compile_writes(copy_in_write=True)
    slots = cache.write_now([(("L", e), expert(e + 1.0)) for e in range(n)], pin=True)
    pool = np.asarray(cache.pool["down"])                    # no flush
    np.testing.assert_array_equal(pool[slots], np.arange(1, n + 1, dtype=np.float32)[:, None].repeat(4, 1))
    assert not pool[sorted(set(range(n + 2)) - set(slots))].any()
    cache.load([(("L", 100), expert(7.0)), (("L", 101), expert(8.0))])    # the two free slots, copies pending
    old = cache.lookup(("L", 100), count=False)
    cache.slots.pin(("L", 101))
    got = cache.write_now([(("L", 200), expert(9.0))])     # evicts expert 100 (the only unpinned one): its slot
    assert got == [old]
    pool = np.asarray(cache.flush()["down"])
    np.testing.assert_array_equal(pool[old], 9.0)
    np.testing.assert_array_equal(pool[cache.lookup(("L", 101), count=False)], 8.0)


def test_process_memory_tracks_resident_pages():
    """process_memory() against the kernel's own accounting: touching 256 MB raises the resident set by about that,
    and the peak is never below the current value nor below getrusage's maximum resident set."""
    import resource

    from dsjax.runtime.metrics import process_memory
    before = process_memory()
    if before["rss"] is None:
        pytest.skip("no /proc/self/status on this OS")
    block = np.ones(256 << 20, np.uint8)                    # touched: every page resident
    after = process_memory()
    assert 200 << 20 <= after["rss"] - before["rss"] <= 320 << 20, (before, after)
    assert after["peak_rss"] >= after["rss"]
    assert after["peak_rss"] >= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 * 0.99
    del block


def test_device_memory_says_nothing_where_the_backend_does_not():
    """The CPU backend keeps no allocator statistics (memory_stats() is None): every field None, as with no device."""
    from dsjax.runtime.metrics import device_memory
    cpu = jax.devices("cpu")[0]
    assert cpu.memory_stats() is None
    assert device_memory(cpu) == device_memory(None) == {"in_use": None, "peak": None, "limit": None}


@pytest.mark.gpu
def test_device_memory_tracks_a_256_mb_array_on_the_gpu():
    """device_memory() against an allocation of known size: a 256 MB array raises the bytes in use by at least that
    (the allocator may round up), the peak is never below the bytes in use and the limit is above both."""
    from dsjax.runtime.metrics import device_memory
    gpu = next(d for d in jax.devices() if d.platform == "gpu")
    before = device_memory(gpu)
    a = jax.device_put(np.ones(256 << 20, np.uint8), gpu)
    a.block_until_ready()
    after = device_memory(gpu)
    assert 256 << 20 <= after["in_use"] - before["in_use"] <= 260 << 20, (before, after)
    assert after["limit"] > after["peak"] >= after["in_use"] and after["peak"] >= before["peak"]
    del a


def test_a_gpu_budget_past_the_allocators_room_is_refused_with_both_sizes_and_the_fixes():
    """check_gpu_room against memory_stats() as a 16 GB card reports it under JAX's default (a 75% limit): a 16 GB
    budget is refused naming the budget, the room, the limit and what is in use, the environment variable and a
    budget that fits (95% of the room, rounded down); a budget within the room passes, as does any budget where the
    backend keeps no statistics (the CPU) or there is no budget."""
    from dsjax.runtime.memory import check_gpu_room
    card = {"bytes_limit": 12 * 10**9, "bytes_in_use": 2 * 10**9}          # 10 GB of room
    with pytest.raises(BudgetError) as err:
        check_gpu_room(16 * 10**9, card, "cuda:0")
    msg = str(err.value)
    for part in ("gpu_memory=16.00 GB", "on cuda:0: 10.00 GB (12.00 GB limit, 2.00 GB in use)",
                 "XLA_PYTHON_CLIENT_MEM_FRACTION=.95", "gpu_memory='9.5GB'", "--gpu-memory 9.5GB"):
        assert part in msg, (part, msg)
    with pytest.raises(BudgetError):
        check_gpu_room(10 * 10**9 + 1, card)                                # one byte past the room
    check_gpu_room(10 * 10**9, card)                                        # exactly the room
    check_gpu_room(16 * 10**9, None)                                        # the CPU backend: no statistics
    check_gpu_room(16 * 10**9, {"bytes_in_use": 0})                         # no limit reported
    check_gpu_room(None, card)                                              # no budget


def test_host_available_reads_memavailable_and_the_check_names_both_sizes(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       131072000 kB\nMemFree:         1000000 kB\nMemAvailable:   41943040 kB\n")
    assert host_available(str(info)) == 41943040 * 1024
    assert host_available(str(tmp_path / "missing")) is None               # no such file: unknown, no check
    (tmp_path / "plain").write_text("x")
    assert host_available(str(tmp_path / "plain" / "meminfo")) is None     # a path below a regular file
    info.write_text("MemTotal: 1 kB\n")
    assert host_available(str(info)) is None                               # an older kernel without the line
    check_host_room(80 * 10**9, None)                                      # unknown: no check
    check_host_room(80 * 10**9, 80 * 10**9)                                # exactly fits
    with pytest.raises(BudgetError, match=r"pins 80\.00 GB of host memory \(host_memory=96\.00 GB\) but this machine "
                                          r"has 40\.00 GB available.*--host-memory 36GB"):
        check_host_room(80 * 10**9, 40 * 10**9, 96 * 10**9)
    assert host_available() is None or host_available() > 0                # this machine's own file parses


def test_the_pinned_pool_is_capped_near_the_plan_before_jax_starts_and_only_over_dsjaxs_own_default(monkeypatch):
    """cap_pinned_host: XLA's pinned BFC pool grows in doubling regions up to XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, so
    the limit dsjax lifts at import is lowered to the plan's need + 10% + 2 GiB, in whole GiB (37.2 GiB, the V3
    slice's plan at 16 GB / 96 GB: 43). Never once JAX's backends run (the variable is read at start), never over a
    limit the user set, never upwards; no need, no change."""
    import dsjax
    from dsjax.runtime.memory import GIB, PINNED_LIMIT_ENV, cap_pinned_host, pinned_cap_gib
    need = int(37.2 * GIB)
    assert pinned_cap_gib(need) == 43 and pinned_cap_gib(0) == 2 and pinned_cap_gib(10 * GIB) == 13
    monkeypatch.setattr(dsjax, "PINNED_LIMIT_SET_BY_DSJAX", True)
    env = {PINNED_LIMIT_ENV: "115"}
    assert cap_pinned_host(need, env, initialized=False) == 43 and env[PINNED_LIMIT_ENV] == "43"
    assert env["DSJAX_PINNED_LIMIT_GB"] == "43"                       # marked as dsjax's, for child processes
    assert cap_pinned_host(int(50 * GIB), env, initialized=False) is None and env[PINNED_LIMIT_ENV] == "43"
    env = {PINNED_LIMIT_ENV: "115"}
    assert cap_pinned_host(need, env, initialized=True) is None and env[PINNED_LIMIT_ENV] == "115"
    assert cap_pinned_host(None, env, initialized=False) is None and env[PINNED_LIMIT_ENV] == "115"
    assert cap_pinned_host(need, {}, initialized=False) is None                     # no limit set at all
    monkeypatch.setattr(dsjax, "PINNED_LIMIT_SET_BY_DSJAX", False)                  # the user's own limit
    assert cap_pinned_host(need, env, initialized=False) is None and env[PINNED_LIMIT_ENV] == "115"


def test_a_plan_past_the_pinned_pools_limit_is_refused_naming_the_limit_and_the_fixes():
    """check_pinned_cap: a later engine whose plan outgrew the cap an earlier one set is refused before anything is
    pinned, naming the limit and the fixes; one within the limit (another preset of about the first's size, using
    the first's margin) loads, as under a limit the user set."""
    from dsjax.runtime.memory import GIB, PINNED_LIMIT_ENV, check_pinned_cap
    env = {PINNED_LIMIT_ENV: "43"}
    check_pinned_cap(int(37.2 * GIB), env)                                # the engine that set it
    check_pinned_cap(43 * GIB, env)                                        # exactly the limit
    with pytest.raises(BudgetError) as err:
        check_pinned_cap(44 * GIB, env)                                    # past it: its own cap would be 51
    msg = str(err.value)
    for part in ("pins 47.24 GB", "capped at 43 GiB", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=51", "a new process",
                 "smaller host budget"):
        assert part in msg, (part, msg)
    with pytest.raises(BudgetError, match="capped at 43 GiB"):
        check_pinned_cap(43 * GIB + 1, env)                                # one byte past
    check_pinned_cap(40 * GIB, {})                                         # no limit: nothing to check


def test_the_pinned_need_planned_before_jax_starts_is_the_engines_own(store):
    """load.pinned_need (what load and bench cap the pool from, computed before any device is touched) equals the
    loaded engine's placement.pinned_host_peak, with and without overlap_io, under budgets that stream experts from
    disk: the host caches plus the prefetch pool (disk reads staged in pinned buffers beside them)."""
    import dsjax
    from dsjax.demo import demo_budgets
    from dsjax.runtime.load import pinned_need
    b = demo_budgets(store)
    for io in (True, False):
        e = dsjax.load(store, dtype="float32", cpu_experts="off", overlap_io=io, **b)
        try:
            p, mb = e.placement, e.model_bytes
            got = p.pinned_host_peak(mb)
            assert p.gpu_expert_slots < mb.n_experts and p.host_experts < mb.n_experts     # GPU and host both stream
            assert got == p.pinned_host_bytes(mb) + p.pools.host_prefetch > mb.embed
            assert pinned_need(store, "float32", overlap_io=io, **b) == got
        finally:
            e.close()


def test_a_fresh_process_loads_with_the_pool_capped_and_a_users_limit_untouched(store, tmp_path):
    """In a new process (JAX's backends not started), dsjax.load lowers dsjax's lifted limit to the cap of its plan's
    pinned bytes before the engine starts JAX; a limit in the user's environment stays as set. (On the CPU backend the
    variable is read by nothing: this checks what the GPU client would read.)"""
    import json
    import os
    import subprocess
    import sys

    from dsjax.demo import demo_budgets
    from dsjax.runtime.memory import PINNED_LIMIT_ENV, PINNED_MARK_ENV, pinned_cap_gib
    child = ("import json, os, sys, dsjax\n"
             "before = os.environ['" + PINNED_LIMIT_ENV + "']\n"
             "e = dsjax.load(sys.argv[1], dtype='float32', cpu_experts='off', **json.loads(sys.argv[2]))\n"
             "print(json.dumps([before, os.environ['" + PINNED_LIMIT_ENV + "'], "
             "e.placement.pinned_host_peak(e.model_bytes)]))\n"
             "e.close()\n")
    b = demo_budgets(store)
    env = {k: v for k, v in os.environ.items() if k not in (PINNED_LIMIT_ENV, PINNED_MARK_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    run = lambda e: json.loads(subprocess.run([sys.executable, "-c", child, store, json.dumps(b)], env=e, check=True,
                                              capture_output=True, text=True, timeout=600).stdout.splitlines()[-1])
    before, after, need = run(env)
    assert int(after) == pinned_cap_gib(need) < int(before)
    users = run(dict(env, **{PINNED_LIMIT_ENV: "7"}))
    assert users[0] == users[1] == "7"
    # a value a parent dsjax process set (and marked) is its default, not the user's: the child starts afresh
    inherited = run(dict(env, **{PINNED_LIMIT_ENV: "1", PINNED_MARK_ENV: "1"}))
    assert inherited[0] == before and int(inherited[1]) == pinned_cap_gib(need)


def test_the_pinned_peak_adds_the_prefetch_pool_only_where_experts_stream_from_disk():
    """Placement.pinned_host_peak on the V3 slice's config (1 dense + 6 MoE layers at V3 width): at 16 GB / 96 GB the
    host cache holds every expert (nothing read from disk after the preload: the caches alone); at 16 GB / 40 GB it
    holds 189 of 256 per layer, so the prefetch pool's staged reads (16/96 of the host budget) come on top."""
    from dsjax.config import ModelConfig
    from dsjax.runtime.planner import ModelBytes, plan
    from dsjax.store.synthetic import v3_slice_config
    mb = ModelBytes.from_config(ModelConfig.from_dict(v3_slice_config(6)))
    kw = dict(max_gpu_layers=3, prefetch_layers=2, context_tokens=4096)
    whole = plan(mb, 16 * 10**9, 96 * 10**9, **kw)
    assert whole.host_experts == mb.n_experts == 256
    assert whole.pinned_host_peak(mb) == whole.pinned_host_bytes(mb)
    part = plan(mb, 16 * 10**9, 40 * 10**9, **kw)
    assert part.host_experts == 189
    assert part.pinned_host_peak(mb) == part.pinned_host_bytes(mb) + 40 * 10**9 * 16 // 96

"""Flat expert buffers (dsjax.runtime.expert_layout) on real stores: flatten -> unflatten is bit-exact for NVFP4,
MXFP4 and plain bf16 projections, a load of n experts is one host->GPU put and one slot write, and the tiered engine
computes the same tokens from flat slots as from the stacked all-on-GPU experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from ckpt_builders import bf16_tensors, write
from dsjax.quant import QTensor
from dsjax.runtime import tiers
from dsjax.runtime.expert_layout import ALIGN, ExpertLayout, flatten, unflatten
from dsjax.runtime.memory import MemoryManager
from dsjax.runtime.metrics import Metrics
from dsjax.runtime.planner import Pools, minimum_gpu_memory, minimum_host_memory
from dsjax.runtime.tiered import model_bytes_from_store
from dsjax.store.reader import Store
from dsjax.store.writer import convert

LAYER = 1                     # the first MoE layer
EXPERTS = [0, 3, 7, 5, 12]
E = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A 3-layer V3-style checkpoint (2 MoE layers of 16 experts, moe_intermediate 48) as an NVFP4 and an MXFP4
    store. MXFP4 keeps the down projection (K=48, not a multiple of 32) in bf16: its experts mix FP4 and plain parts."""
    base = tmp_path_factory.mktemp("flat")
    _, cfg_dict, tensors = bf16_tensors(num_hidden_layers=3, n_routed_experts=E)
    write(base / "src", cfg_dict, tensors)
    out = {}
    for fmt in ("nvfp4", "mxfp4"):
        convert(base / "src", base / fmt, fmt, "experts", progress=False)
        out[fmt] = str(base / fmt)
    return out


def _read(store: Store, experts):
    return {proj: f.result() for proj, f in store.read_experts(LAYER, experts).items()}


def _assert_bits(got, want, what):
    got = np.asarray(got)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    diff = np.flatnonzero(got.reshape(-1).view(np.uint8) != want.reshape(-1).view(np.uint8))
    assert diff.size == 0, f"{what}: {diff.size} bytes differ, first at byte {diff[0]}"


def _assert_experts(tree, parts, store: Store, what):
    """tree {proj: QTensor | array [k, ...]} holds exactly the store's parts {proj: {field: [k, ...]}}."""
    for proj, fields in parts.items():
        rec = store.expert_record(LAYER, proj)
        if rec.is_fp4:
            assert isinstance(tree[proj], QTensor) and tree[proj].fmt == rec.dtype, f"{what} {proj}: {tree[proj]!r}"
            for field, want in fields.items():
                _assert_bits(getattr(tree[proj], field), want, f"{what} {proj}.{field}")
        else:
            _assert_bits(tree[proj], fields["weight"], f"{what} {proj} (plain {rec.dtype})")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_flatten_unflatten_is_bit_exact(stores, fmt):
    store = Store(stores[fmt])
    layout = ExpertLayout.of_store(store, LAYER)
    plain = {proj for proj, f in layout.fmts if f is None}
    assert plain == ({"down"} if fmt == "mxfp4" else set())
    assert all(p.offset % ALIGN == 0 for p in layout.parts) and layout.nbytes % ALIGN == 0
    stored = sum(store.expert_record(LAYER, proj).bytes // E for proj, _ in layout.fmts)
    assert stored <= layout.nbytes < stored + len(layout.parts) * ALIGN
    parts = _read(store, EXPERTS)
    rows = flatten(parts, layout)
    assert rows.shape == (len(EXPERTS), layout.nbytes) and rows.dtype == np.uint8
    _assert_experts(jax.jit(unflatten, static_argnums=1)(jnp.asarray(rows), layout), parts, store, fmt)
    one = jax.jit(unflatten, static_argnums=1)(jnp.asarray(rows[2]), layout)        # one expert, no leading axis
    _assert_experts(jax.tree.map(lambda a: a[None], one), _read(store, [EXPERTS[2]]), store, f"{fmt} one expert")
    # The layout is the same for every MoE layer; a part of another shape is refused, not packed at the wrong size.
    bad = dict(parts, gate=dict(parts["gate"], scales=parts["gate"]["scales"][:, :-1]))
    with pytest.raises(ValueError, match="gate/scales"):
        flatten(bad, layout)


def test_one_load_is_one_put_and_one_slot_write(stores, monkeypatch):
    """The host cache holds one pinned uint8 buffer per expert; loading n experts issues one device_put (of n
    arrays) and, at the flush, one slot write (of n rows, bucketed to a power of two); the slots then hold the
    store's bits."""
    store = Store(stores["mxfp4"])
    layout = ExpertLayout.of_store(store, LAYER)
    mm = MemoryManager(Pools.split(1 << 30, 1 << 30))
    metrics = Metrics(3, E)
    host = tiers.HostCache(8, mm, metrics, layout.nbytes, device=jax.devices()[0])
    disk = tiers.DiskReader(store, metrics, layout)
    staged = disk.read(LAYER, EXPERTS, stage=host.put).result()
    disk.close()
    for e in EXPERTS:
        got = host.get((LAYER, e))
        assert got is staged[e] and got.shape == (layout.nbytes,) and got.dtype == jnp.uint8, e
        assert got.sharding.memory_kind == "pinned_host"
    assert mm.report()["host_layer_cache"]["used"] == len(EXPERTS) * layout.nbytes

    cache = tiers.ExpertCache(16, layout, mm, metrics, device=jax.devices()[0])
    assert {a.shape[0] for a in jax.tree.leaves(cache.pool)} == {16}      # per-part slot arrays, read in place
    assert mm.report()["expert_cache"]["used"] == 16 * layout.nbytes
    puts, writes = [], []
    real_put, real_write = jax.device_put, tiers._write_slots
    monkeypatch.setattr(jax, "device_put", lambda x, *a, **k: puts.append(len(jax.tree.leaves(x))) or
                        real_put(x, *a, **k))
    monkeypatch.setattr(tiers, "_write_slots", lambda pool, slots, rows, layout: writes.append(len(rows)) or
                        real_write(pool, slots, rows, layout))
    slots = cache.load([((LAYER, e), host.get((LAYER, e))) for e in EXPERTS])
    assert puts == [len(EXPERTS)] and writes == []              # copies issued; written only when needed
    cache.flush()
    assert puts == [len(EXPERTS)] and writes == [8]
    monkeypatch.undo()
    _assert_experts(jax.tree.map(lambda a: a[jnp.asarray(slots)], cache.pool), _read(store, EXPERTS), store, "slots")


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_tiered_tokens_equal_the_all_on_gpu_tokens(stores, fmt):
    """Through flat GPU slots (a tight budget: experts come from disk and the host cache) the engine makes the same
    tokens as with every expert stacked on the GPU; MXFP4 also moves plain bf16 parts through the buffers."""
    store = stores[fmt]
    mb = model_bytes_from_store(Store(store))
    tight = dict(max_gpu_layers=1, prefetch_layers=1)
    prompts = [[0, 17, 42, 99, 7, 3, 250, 11], [0, 5, 6]]
    want = [g.token_ids for g in dsjax.load(store, dtype="float32").generate(prompts, max_new_tokens=8,
                                                                             stop_token_ids=())]
    e = dsjax.load(store, dtype="float32", gpu_memory=minimum_gpu_memory(mb, context_tokens=512, **tight),
                   host_memory=minimum_host_memory(mb), **tight)
    assert e.experts is not None and e.experts.slots.capacity < 2 * E         # slots are reused
    assert [g.token_ids for g in e.generate(prompts, max_new_tokens=8, stop_token_ids=())] == want
    assert e.stats()["links"]["disk->host"]["bytes"] > 0

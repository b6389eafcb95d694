"""Flat expert buffers (dsjax.runtime.expert_layout) on real stores: flatten -> unflatten is bit-exact for NVFP4,
MXFP4 and plain bf16 projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckpt_builders import bf16_tensors, write
from dsjax.quant import QTensor
from dsjax.runtime.expert_layout import ALIGN, ExpertLayout, flatten, unflatten
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

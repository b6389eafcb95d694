"""Grouped FP4 expert matmul and fused SwiGLU: the tile schedule and references on CPU, the kernels in Pallas
interpret mode on CPU, and the compiled kernels against the references on the GPU (ragged and empty groups,
rows past the groups, both formats)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax_kernels.moe_gmm import (MoeGmmConfig, expert_swiglu, expert_swiglu_reference, moe_gmm,
                                   moe_gmm_reference, tile_schedule)
from dsjax_kernels.moe_gmm.kernel import default_config as default_grouped
from fp4_cases import assert_kernel_close, dequant_oracle, fresh_rng, poison_device_memory, random_fp4

FMTS = ["nvfp4", "mxfp4"]


def grouped_oracle(x, w, group_sizes):
    """float64 y over rows sorted by group; rows past the groups are zero."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    y = np.zeros((x.shape[0], w.shape[1]))
    r = 0
    for g, c in enumerate(np.asarray(group_sizes)):
        y[r:r + c] = x[r:r + c] @ w[g].T
        r += c
    return y


def test_bad_grouped_config_rejected():
    x = jnp.zeros((4, 64), jnp.bfloat16)
    p, s = jnp.zeros((2, 32, 32), jnp.uint8), jnp.zeros((2, 32, 4), jnp.uint8)
    sizes, gs = jnp.asarray([3, 1], jnp.int32), jnp.ones((2,), jnp.float32)
    bad = {"schedule": dict(schedule="by_expert"), "x_pairs": dict(x_pairs=True, x_split=False),
           "split_k=3 must divide": dict(split_k=3),
           "split_k=2 needs schedule 'tiles'": dict(split_k=2, schedule="slots")}
    for match, fields in bad.items():
        with pytest.raises(ValueError, match=match):
            moe_gmm(x, p, s, gs, sizes, fmt="nvfp4", config=MoeGmmConfig(bm=16, bn=16, bkh=16, **fields),
                    interpret=True)


def test_tile_schedule_covers_every_row_once():
    rng, seed = fresh_rng()
    schedule = jax.jit(tile_schedule, static_argnums=(1, 2))          # one compile per bm: shapes fixed below
    s, t = 6, 200
    for i in range(16):
        bm = (16, 32)[i % 2]
        sizes = rng.integers(0, 33, size=s) * (rng.random(s) < 0.7)
        slot, start, end = (np.asarray(a) for a in schedule(jnp.asarray(sizes, jnp.int32), t, bm))
        owner = np.full(t, -2)
        for g, r0, r1 in zip(slot, start, end):
            rows = np.arange(r0, min(r0 + bm, r1))
            assert (owner[rows] == -2).all(), f"row written twice (seed {seed})"
            owner[rows] = g
        expect = np.concatenate([np.repeat(np.arange(s), sizes), np.full(t - sizes.sum(), -1)])
        np.testing.assert_array_equal(owner, expect, err_msg=f"sizes {sizes} T={t} bm={bm} seed {seed}")


@pytest.mark.parametrize("fmt", FMTS)
def test_reference_matches_oracle(fmt):
    rng, seed = fresh_rng()
    packed, scales, gs = random_fp4(rng, (4, 32, 128), fmt)
    sizes = np.array([3, 0, 9, 1], np.int32)
    x = rng.standard_normal((16, 128)).astype(np.float32)
    y = moe_gmm_reference(jnp.asarray(x), packed, scales, gs, jnp.asarray(sizes), fmt=fmt)
    expect = grouped_oracle(x, dequant_oracle(packed, scales, gs, fmt), sizes)
    assert_kernel_close(y, expect, "reference_vs_oracle_f32", f"{fmt} seed {seed}")


VARIANTS = {            # config fields beside the tiles: the XLA-built tile list on split x, and the one-launch forms
    "tiles": {}, "pairs": dict(x_pairs=True), "slots": dict(schedule="slots", split_k=1),   # (slots: no split-K)
    "slots_pairs": dict(schedule="slots", x_pairs=True, split_k=1),
    "slots_interleaved": dict(schedule="slots", x_split=False, split_k=1),
    "w_lhs": dict(w_lhs=True), "w_lhs8": dict(w_lhs=True, bm=8),          # the weight as the dot's left operand
    "slots_w_lhs8": dict(schedule="slots", x_pairs=True, w_lhs=True, bm=8, split_k=1),
    "split_w_lhs8": dict(w_lhs=True, bm=8, split_k=2),        # K over 2 programs, the last one adds the partials
}


@pytest.mark.parametrize("decode,variant", [("jnp", "tiles"), ("ptx", "tiles"), ("ptx", "slots_pairs"),
                                            ("jnp", "slots"), ("jnp", "pairs"), ("jnp", "slots_interleaved"),
                                            ("ptx", "w_lhs8"), ("jnp", "slots_w_lhs8"), ("ptx", "split_w_lhs8"),
                                            ("jnp", "split_w_lhs8")])
@pytest.mark.parametrize("fmt", FMTS)
def test_kernels_interpret(fmt, decode, variant):
    rng, seed = fresh_rng()
    s, n, k, t = 4, 32, 128, 30
    packed, scales, gs = random_fp4(rng, (s, n, k), fmt)
    sizes = jnp.asarray([3, 0, 20, 1], jnp.int32)                     # empty group, straddling tiles, 6 zero rows
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    v = VARIANTS[variant]
    cfg = dataclasses.replace(MoeGmmConfig(bm=16, bn=16, bkh=32, decode=decode), **v)   # ptx: emulated in jnp
    y = moe_gmm(x, packed, scales, gs, sizes, fmt=fmt, config=cfg, interpret=True)
    assert_kernel_close(y, moe_gmm_reference(x, packed, scales, gs, sizes, fmt=fmt), "kernel_vs_reference",
                        f"interpret moe_gmm {fmt} {variant} seed {seed}")
    down = random_fp4(rng, (s, k, n), fmt)
    z = expert_swiglu(x, (packed, scales, gs), (packed, scales, gs), down, sizes, fmt=fmt,
                      config=(cfg, dataclasses.replace(cfg, bkh=16, split_k=1)), interpret=True)
    zr = expert_swiglu_reference(x, (packed, scales, gs), (packed, scales, gs), down, sizes, fmt=fmt)
    assert_kernel_close(z, zr, "swiglu_vs_reference", f"interpret expert_swiglu {fmt} seed {seed}")


@pytest.mark.parametrize("sizes", [[3, 0, 5, 1], [40, 0, 77, 9]])
def test_default_tiles_interpret(sizes):
    """The tiles default_config picks: PTX decode for decode-sized groups, interleaved x for prefill-sized ones."""
    rng, seed = fresh_rng()
    s, n, k = len(sizes), 64, 64
    sizes = jnp.asarray(sizes, jnp.int32)
    t = int(sizes.sum()) + 2
    cfg = default_grouped(t, n, k, s)
    assert (cfg.decode, cfg.x_split) == (("ptx", True) if t / s <= 16 else ("jnp", False)), cfg
    packed, scales, gs = random_fp4(rng, (s, n, k), "nvfp4")
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    y = moe_gmm(x, packed, scales, gs, sizes, fmt="nvfp4", interpret=True)
    assert_kernel_close(y, moe_gmm_reference(x, packed, scales, gs, sizes, fmt="nvfp4"), "kernel_vs_reference",
                        f"interpret moe_gmm default tiles {cfg} seed {seed}")
    down = random_fp4(rng, (s, k, n), "nvfp4")
    z = expert_swiglu(x, (packed, scales, gs), (packed, scales, gs), down, sizes, fmt="nvfp4", interpret=True)
    zr = expert_swiglu_reference(x, (packed, scales, gs), (packed, scales, gs), down, sizes, fmt="nvfp4")
    assert_kernel_close(z, zr, "swiglu_vs_reference", f"interpret expert_swiglu default tiles seed {seed}")


GPU_CASES = [   # (group sizes, extra rows past the groups, N, K)
    ([1, 2, 8, 3, 5, 7, 4, 6], 0, 2048, 7168),                       # decode: 8 experts, 1-8 tokens
    ([0, 5, 0, 0, 17, 1, 0, 33], 3, 512, 1024),                       # empty slots, straddling tiles, zero rows
    ([0, 0, 0, 0], 5, 256, 512),                                       # nothing routed: all zeros
    ([200, 0, 77, 129, 1, 300], 0, 1024, 2048),                        # prefill-sized ragged groups
    (list(range(0, 64)), 10, 7168, 2048),                              # 64 slots, 0..63 rows
]


@pytest.mark.gpu
class TestMoeGmmGpu:
    @pytest.mark.parametrize("decode,variant", [("jnp", "tiles"), ("ptx", "tiles"), ("ptx", "slots_pairs"),
                                                ("jnp", "slots"), ("ptx", "pairs"), ("ptx", "w_lhs8"),
                                                ("jnp", "w_lhs"), ("ptx", "slots_w_lhs8"), ("ptx", "split_w_lhs8")])
    @pytest.mark.parametrize("fmt", FMTS)
    @pytest.mark.parametrize("sizes,extra,n,k", GPU_CASES)
    def test_moe_gmm_vs_reference(self, fmt, sizes, extra, n, k, decode, variant):
        rng, seed = fresh_rng()
        sizes = jnp.asarray(sizes, jnp.int32)
        t = int(sizes.sum()) + extra
        packed, scales, gs = (jnp.asarray(a) for a in random_fp4(rng, (len(sizes), n, k), fmt))
        x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
        cfg = dataclasses.replace(default_grouped(t, n, k, len(sizes)), decode=decode,   # the default tiles,
                                  **VARIANTS[variant])                                   # on split x for PTX
        if decode == "ptx" or cfg.x_pairs:
            cfg = dataclasses.replace(cfg, x_split=True)
        ref = moe_gmm_reference(x, packed, scales, gs, sizes, fmt=fmt)
        for run in range(2):
            poison_device_memory()
            y = moe_gmm(x, packed, scales, gs, sizes, fmt=fmt, config=cfg)
            assert_kernel_close(y, ref, "kernel_vs_reference",
                                f"{decode} {variant} {fmt} sizes {list(sizes)} T={t} N={n} K={k} run {run} seed {seed}")
            assert not np.asarray(y[int(sizes.sum()):]).any(), "rows past the groups must be zero"

    @pytest.mark.parametrize("fmt", FMTS)
    @pytest.mark.parametrize("sizes,extra", [([1, 2, 8, 3, 5, 7, 4, 6], 0), ([0, 9, 0, 40, 1], 2),
                                              ([130, 0, 64, 257], 0)])
    @pytest.mark.parametrize("one_launch", [False, True, "w_lhs", "split"])
    def test_expert_swiglu_vs_reference(self, fmt, sizes, extra, one_launch):
        rng, seed = fresh_rng()
        d, i = 1024, 512
        sizes = jnp.asarray(sizes, jnp.int32)
        t = int(sizes.sum()) + extra
        gate, up = (tuple(jnp.asarray(a) for a in random_fp4(rng, (len(sizes), i, d), fmt)) for _ in range(2))
        down = tuple(jnp.asarray(a) for a in random_fp4(rng, (len(sizes), d, i), fmt))
        x = jnp.asarray(rng.standard_normal((t, d)) * 0.05, jnp.bfloat16)
        ref = expert_swiglu_reference(x, gate, up, down, sizes, fmt=fmt)
        cfg = None
        if one_launch:      # the slots schedule on x's column pairs with the PTX decode, for both launches
            one = dict(schedule="slots", x_pairs=True, x_split=True, decode="ptx", split_k=1)
            if one_launch == "w_lhs":          # the default tiles with the weight as the dot's left operand
                one = dict(w_lhs=True)
            if one_launch == "split":          # 8-row tiles, K over 2 programs (silu * up by the last of them)
                one = dict(w_lhs=True, bm=8, split_k=2, schedule="tiles", x_pairs=False, x_split=True, decode="ptx")
            cfg = (dataclasses.replace(default_grouped(t, i, d, len(sizes)), **one),
                   dataclasses.replace(default_grouped(t, d, i, len(sizes)), **one))
        poison_device_memory()
        y = expert_swiglu(x, gate, up, down, sizes, fmt=fmt, config=cfg)
        assert_kernel_close(y, ref, "swiglu_vs_reference", f"{fmt} sizes {list(sizes)} T={t} {cfg} seed {seed}")

    @pytest.mark.parametrize("fmt", FMTS)
    @pytest.mark.parametrize("split_k,n,k", [(7, 2048, 7168), (14, 2048, 7168), (4, 7168, 2048)])
    def test_split_k_at_v3_shapes(self, fmt, split_k, n, k):
        """Decode-sized groups (8 experts, 1-8 rows, zero rows past them) with K over split_k programs per tile."""
        rng, seed = fresh_rng()
        sizes = jnp.asarray([1, 2, 8, 3, 0, 7, 4, 6], jnp.int32)
        t = int(sizes.sum()) + 3
        packed, scales, gs = (jnp.asarray(a) for a in random_fp4(rng, (len(sizes), n, k), fmt))
        x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
        cfg = dataclasses.replace(default_grouped(t, n, k, len(sizes)), split_k=split_k, schedule="tiles")
        ref = moe_gmm_reference(x, packed, scales, gs, sizes, fmt=fmt)
        for run in range(2):
            poison_device_memory()
            y = moe_gmm(x, packed, scales, gs, sizes, fmt=fmt, config=cfg)
            assert_kernel_close(y, ref, "kernel_vs_reference", f"{cfg} {fmt} run {run} seed {seed}")
            assert not np.asarray(y[int(sizes.sum()):]).any(), "rows past the groups must be zero"

"""Grouped FP4 expert matmuls for MoE: rows sorted by expert slot, weights [S, N, K/2] resident in GPU slots.

Pallas on the Triton lowering, like fp4_matmul (same decode, decode.py). A static-size tile schedule, built in
jnp from `group_sizes`, maps each program along the last grid axis to (slot, first row, end row): every non-empty
group gets ceil(size / bm) row tiles, empty slots get none (so an idle slot's weights are never read), and
trailing rows past sum(group_sizes) get "zero" tiles that write zeros, as `lax.ragged_dot` does. Unused schedule
entries exit at once. Row tiles may straddle the next group: loads and stores are masked to the tile's own rows.
With split_k the K loop of a tile is spread over several programs and the last to finish adds their partials
(still one launch). Computing the tile list inside the kernel instead (each program from one load of
group_sizes) made every program wait on two cumsums and five reductions before its first weight load: 1.07-1.4x
slower kernels at decode sizes on the H200 (kernel run 9), more than the ~2-4 us of XLA work it saves. For
decode-sized groups the 'slots' schedule needs no XLA work before the launch: one program per (N tile, slot)
finds its rows from a prefix sum of group_sizes inside the kernel; with x_pairs the kernel reads x's column pairs
itself, so a grouped matmul is one launch.

`expert_swiglu` fuses gate and up into one kernel that reads both weights against one activation tile and
writes silu(gate) * up in bf16, so the [T, 2I] pre-activations never reach HBM; the down projection is a
second `moe_gmm` launch.
"""

# T token rows (sorted by slot), S expert slots, N out-features, K in-features, H = K/2, I intermediate

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsjax_kernels.fp4_matmul.decode import bf16_pairs, check_fmt, decode_halves, decode_tile, pairs_to_bf16
from dsjax_kernels.fp4_matmul.kernel import (check_layout, check_pow2_tiles, count_in, first_fit, nt_dot,
                                             split_even_odd, sum_partials)
from dsjax_kernels.moe_gmm.reference import weight_parts


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeGmmConfig:
    """Tiles: bm rows per program (power of two >= 16; >= 8 with w_lhs), bn out-features, bkh packed bytes per K step;
    x_split, x_pairs and decode as in Fp4MatmulConfig.

    schedule: 'tiles' (a list of (slot, rows) tiles built in XLA from group_sizes, one program per tile: even work
    for large groups) or 'slots' (one program per slot and N tile, walking its rows in bm-row tiles; the row range
    comes from a prefix sum inside the kernel, so nothing runs before the launch: for decode-sized groups).
    split_k: (schedule 'tiles') K sliced over split_k programs per tile, so that more programs stream a slot's
    weight when there are few tiles and a long K; each writes float32 partials and counts itself in on a per-tile
    atomic counter, and the last to arrive adds the partials in K order, applies the global scales (and silu * up)
    and writes the tile: still one launch (as Fp4MatmulConfig's k_reduce='kernel').
    """

    bm: int = 16
    bn: int = 64
    bkh: int = 128
    num_warps: int = 4
    num_stages: int = 4
    x_split: bool = True
    decode: str = "jnp"          # as Fp4MatmulConfig.decode
    x_pairs: bool = False
    schedule: str = "tiles"
    w_lhs: bool = False          # as Fp4MatmulConfig.w_lhs
    split_k: int = 1


SCHEDULES = ("tiles", "slots")


def default_config(t: int, n: int, k: int, num_slots: int, num_weights: int = 1) -> MoeGmmConfig:
    """Small tiles with the PTX decode when groups are small (decode: 8-row tiles with the weight as the dot's left
    operand up to 8 rows a group on average, K split when few programs would run; 16-row tiles up to 16), 64x128
    or 128x128 tiles on interleaved x for prefill-sized groups: the fastest of kernel run 6's sweep
    (bench/RESULTS.md) at 8 and 64 experts with 1-8 rows each (PTX: 1.3-1.4x the jnp decode) and at 64 experts
    with 48-80 rows (interleaved x: 2.7x split x). num_weights 2: the fused gate/up launch of expert_swiglu."""
    h = k // 2
    bkh = first_fit(h, (128, 64, 32, 16))
    per_group = t / max(num_slots, 1)
    if per_group <= 8:
        # 8-row tiles with the weight as the dot's left operand: kernel run 8 (bench/RESULTS.md), 64 experts x 1-8
        # rows 228-233 us (61-62% of HBM) against 301-305 for run 6's tiles; 8 experts x 1-8 rows 36.5 us against
        # 46.4 at K=2048 N=7168. Kernel run 9: K split over programs (the last adds the partials) when fewer than
        # 448 per weight would stream the slots (estimated as one 8-row tile per used slot): 8 experts x 1-8 rows
        # at K=7168 N=2048 38.7 us with split 2 against 52.3 unsplit; the fused gate/up (two weights) 76.4 us of
        # kernel at split 4 against 94.5. Shapes with >= 448 programs (K=2048 N=7168, 64 experts) ran faster unsplit.
        bn = first_fit(n, (64, 32, 16))
        steps = h // bkh
        programs = n // bn * max(min(num_slots, t), -(-t // 8))
        splits = [s for s in range(1, steps + 1) if steps % s == 0 and s <= max(1, steps // 2)]
        split_k = next((s for s in splits if programs * s >= 448 * num_weights), splits[-1])
        return MoeGmmConfig(bm=8, bn=bn, bkh=bkh, num_warps=4, num_stages=4, decode="ptx", w_lhs=True,
                            split_k=split_k)
    if per_group <= 16:
        bn = first_fit(n, (64, 32, 16))
        return MoeGmmConfig(bm=16, bn=bn, bkh=bkh, num_warps=4, num_stages=4, decode="ptx")
    bn = first_fit(n, (128, 64, 32, 16))
    return MoeGmmConfig(bm=64 if per_group <= 64 else 128, bn=bn, bkh=min(bkh, 32), num_warps=8, num_stages=3,
                        x_split=False)


def _padded_slots(num_slots: int) -> int:
    """Length of the padded group_sizes vector the slots kernel loads in one piece (a power of two >= 16)."""
    return max(16, 1 << (num_slots - 1).bit_length())


def tile_schedule(group_sizes: jax.Array, num_rows: int, bm: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(slot, row_start, row_end) int32 arrays of static length ceil(T/bm) + S + 1 (an upper bound on the tiles).

    slot -1 marks a tile of the zero rows past sum(group_sizes); entries with row_start >= row_end are unused.
    """
    s = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    incl = jnp.cumsum(sizes)
    ends = jnp.minimum(incl, num_rows)
    starts = jnp.minimum(incl - sizes, num_rows)          # (not a concatenate: that cost the GPU a device copy)
    tiles = (ends - starts + bm - 1) // bm                                     # [S]; 0 for empty groups
    tile_end = jnp.cumsum(tiles)
    tile_begin = tile_end - tiles
    total_rows, total_tiles = ends[-1], tile_end[-1]
    max_tiles = pl.cdiv(num_rows, bm) + s + 1
    t = jnp.arange(max_tiles, dtype=jnp.int32)
    # first slot whose tiles end after t, by compare-and-count over [tiles, S] (one fusion; searchsorted's loop
    # was several small kernels)
    slot = jnp.sum(tile_end[None, :] <= t[:, None], axis=1, dtype=jnp.int32)
    real = slot < s
    si = jnp.minimum(slot, s - 1)
    row_start = jnp.where(real, starts[si] + (t - tile_begin[si]) * bm, total_rows + (t - total_tiles) * bm)
    row_end = jnp.where(real, ends[si], num_rows)
    return jnp.where(real, slot, -1), jnp.minimum(row_start, num_rows), row_end


def _tile(x_ref, xo_ref, w_refs, outs, *, slot, r0, r1, n0, fmt, cfg: MoeGmmConfig, k_steps: int,
          num_weights: int, interpret: bool, i_k=0, counter=None):
    """Rows [r0, min(r0 + bm, r1)) of slot `slot` times its weights' out-features [n0, n0 + bn): the K loop (K
    slice i_k of k_steps steps), the global scales, silu(gate) * up for two weights, and a store masked to the
    tile's own rows. outs: (o_ref,), or with split-K (partials [W * split_k, T, N], o_ref, counters) and `counter`
    the tile's entry."""
    bs = check_fmt(fmt)
    bm, bn, bkh = cfg.bm, cfg.bn, cfg.bkh
    sg = bkh // (bs // 2)
    row_ok = (r0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < r1                 # [bm, 1]
    x_mask = jnp.broadcast_to(row_ok, (bm, bkh if cfg.x_split else 2 * bkh))

    h_base = i_k * (k_steps * bkh)

    def step(i, accs):
        h0 = pl.multiple_of(h_base + i * bkh, bkh)
        if cfg.x_pairs:
            xe, xo = pairs_to_bf16(plt.load(x_ref.at[pl.ds(r0, bm), pl.ds(h0, bkh)], mask=x_mask, other=0))
        elif cfg.x_split:
            xe = plt.load(x_ref.at[pl.ds(r0, bm), pl.ds(h0, bkh)], mask=x_mask, other=0)
            xo = plt.load(xo_ref.at[pl.ds(r0, bm), pl.ds(h0, bkh)], mask=x_mask, other=0)
        else:
            x = plt.load(x_ref.at[pl.ds(r0, bm), pl.ds(2 * h0, 2 * bkh)], mask=x_mask, other=0)
        new = []
        for j in range(num_weights):
            p_ref, s_ref = w_refs[3 * j], w_refs[3 * j + 1]
            p = p_ref[slot, pl.ds(n0, bn), pl.ds(h0, bkh)]                     # uint8 [bn, bkh]
            s = s_ref[slot, pl.ds(n0, bn), pl.ds(h0 // (bs // 2), sg)]         # uint8 [bn, sg]
            if cfg.x_split:
                lo, hi = decode_halves(p, s, fmt, xe.dtype, cfg.decode, interpret)      # bf16 [bn, bkh] each
                acc = accs[j] + nt_dot(xe, lo, cfg.w_lhs) + nt_dot(xo, hi, cfg.w_lhs)
            else:
                w = decode_tile(p, s, fmt, x.dtype)                            # bf16 [bn, 2 bkh]
                acc = accs[j] + nt_dot(x, w, cfg.w_lhs)
            new.append(acc)
        return tuple(new)

    acc_shape = (bn, bm) if cfg.w_lhs else (bm, bn)
    accs = jax.lax.fori_loop(0, k_steps, step, tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(num_weights)))
    accs = [a.T for a in accs] if cfg.w_lhs else accs
    mask = jnp.broadcast_to(row_ok, (bm, bn))
    tile = (pl.ds(r0, bm), pl.ds(n0, bn))

    def write(o_ref, sums):
        ys = [sums[j] * w_refs[3 * j + 2][slot] for j in range(num_weights)]
        y = ys[0] if num_weights == 1 else ys[0] / (1.0 + jnp.exp(-ys[0])) * ys[1]   # silu(gate) * up, float32
        plt.store(o_ref.at[tile], y.astype(o_ref.dtype), mask=mask)

    if cfg.split_k == 1:
        write(outs[0], accs)
        return
    ws_ref, o_ref, cnt_ref = outs
    for j in range(num_weights):
        plt.store(ws_ref.at[(j * cfg.split_k + i_k, *tile)], accs[j], mask=mask)

    @pl.when(count_in(cnt_ref, counter, interpret) == cfg.split_k - 1)
    def _():                           # the tile's last program
        write(o_ref, [sum_partials(ws_ref, j * cfg.split_k, cfg.split_k, tile, mask) for j in range(num_weights)])


def _zero_tile(o_ref, *, r0, r1, n0, cfg: MoeGmmConfig):
    row_ok = (r0 + jax.lax.broadcasted_iota(jnp.int32, (cfg.bm, 1), 0)) < r1
    plt.store(o_ref.at[pl.ds(r0, cfg.bm), pl.ds(n0, cfg.bn)], jnp.zeros((cfg.bm, cfg.bn), o_ref.dtype),
              mask=jnp.broadcast_to(row_ok, (cfg.bm, cfg.bn)))


def _grouped_kernel(slot_ref, start_ref, end_ref, x_ref, xo_ref, *refs, num_weights: int, **kw):
    """schedule='tiles', grid (N/bn, split_k, tiles): program (n, k, t) computes K slice k of tile t of
    tile_schedule's list. num_weights 1: y = x W.T; 2 (gate, up): y = silu(x Wg.T) * (x Wu.T). x_ref/xo_ref: x's
    even and odd columns (x_split), x's column pairs (x_pairs; xo_ref unused) or x (xo_ref unused). refs: the
    weights' (packed, scales, global scale), then the output, or with split-K (counters in, partials, output,
    counters out)."""
    cfg = kw["cfg"]
    w_refs = refs[:3 * num_weights]
    outs = refs[3 * num_weights:] if cfg.split_k == 1 else refs[3 * num_weights + 1:]
    o_ref = outs[0] if cfg.split_k == 1 else outs[1]
    i_n, i_k, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot, r0, r1 = slot_ref[t], start_ref[t], end_ref[t]
    n0 = i_n * cfg.bn

    @pl.when(jnp.logical_and(r0 < r1, slot >= 0))
    def _compute():
        _tile(x_ref, xo_ref, w_refs, outs, slot=slot, r0=r0, r1=r1, n0=n0, num_weights=num_weights, i_k=i_k,
              counter=t * pl.num_programs(0) + i_n, **kw)

    @pl.when(jnp.logical_and(jnp.logical_and(r0 < r1, slot < 0), i_k == 0))
    def _zero_rows():
        _zero_tile(o_ref, r0=r0, r1=r1, n0=n0, cfg=cfg)


def _slot_kernel(sizes_ref, x_ref, xo_ref, *refs, num_weights: int, num_slots: int, num_rows: int, **kw):
    """schedule='slots', grid (N/bn, S + 1): program s < S finds its rows [r0, r1) from a prefix sum of group_sizes
    (one vector load) and walks them in bm-row tiles (none for an empty slot); program S writes zeros to the rows
    past sum(group_sizes). No schedule is built outside the kernel: one launch in all."""
    cfg = kw["cfg"]
    w_refs, o_ref = refs[:3 * num_weights], refs[3 * num_weights]
    s = pl.program_id(1)
    n0 = pl.program_id(0) * cfg.bn
    sp = _padded_slots(num_slots)
    idx = jax.lax.broadcasted_iota(jnp.int32, (sp,), 0)
    sizes = plt.load(sizes_ref.at[pl.ds(0, sp)], mask=idx < num_slots, other=0)
    before = jnp.minimum(jnp.sum(jnp.where(idx < s, sizes, 0)), num_rows)
    end = jnp.minimum(before + jnp.sum(jnp.where(idx == s, sizes, 0)), num_rows)
    is_zeros = s == num_slots
    end = jnp.where(is_zeros, num_rows, end)

    def tile(i, carry):
        r0 = before + i * cfg.bm

        @pl.when(jnp.logical_not(is_zeros))
        def _compute():
            _tile(x_ref, xo_ref, w_refs, (o_ref,), slot=s, r0=r0, r1=end, n0=n0, num_weights=num_weights, **kw)

        @pl.when(is_zeros)
        def _zero_rows():
            _zero_tile(o_ref, r0=r0, r1=end, n0=n0, cfg=cfg)
        return carry

    jax.lax.fori_loop(0, (end - before + cfg.bm - 1) // cfg.bm, tile, 0)


def _grouped_call(x, weights, group_sizes, *, fmt, cfg, num_weights, interpret):
    t, k = x.shape
    packed = weights[0][0]
    s_slots, n, h = packed.shape
    bs = check_fmt(fmt)
    if 2 * h != k:
        raise ValueError(f"x [T, K] = {x.shape} does not match packed [S, N, K/2] = {packed.shape}")
    if group_sizes.shape != (s_slots,):
        raise ValueError(f"group_sizes shape {group_sizes.shape} must be [S] = ({s_slots},)")
    check_pow2_tiles(cfg)
    if n % cfg.bn or h % cfg.bkh or cfg.bkh % (bs // 2):
        raise ValueError(f"tiles {cfg} do not divide N={n}, K/2={h} (format {fmt}, block {bs})")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.split_k < 1 or (h // cfg.bkh) % cfg.split_k:
        raise ValueError(f"split_k={cfg.split_k} must divide the K steps K/2/bkh = {h // cfg.bkh} ({cfg})")
    if cfg.split_k > 1 and cfg.schedule != "tiles":
        raise ValueError(f"split_k={cfg.split_k} needs schedule 'tiles' (set split_k=1 for 'slots'): {cfg}")
    check_layout(cfg)
    rows = t
    if interpret:                      # the interpreter clamps out-of-range slices: give every tile real rows
        rows = t + cfg.bm
        x = jnp.pad(x, ((0, cfg.bm), (0, 0)))
    if cfg.x_pairs:
        xs = [bf16_pairs(x), jnp.zeros((1, 1), jnp.uint32)]
    elif cfg.x_split:
        xs = list(split_even_odd(x))
    else:
        xs = [x, jnp.zeros((1, 1), x.dtype)]
    kw = dict(fmt=fmt, cfg=cfg, k_steps=h // cfg.bkh // cfg.split_k, num_weights=num_weights, interpret=interpret)
    if cfg.schedule == "slots":
        args = [jnp.pad(group_sizes.astype(jnp.int32), (0, _padded_slots(s_slots) - s_slots))] + xs
        kernel = functools.partial(_slot_kernel, num_slots=s_slots, num_rows=t, **kw)
        grid = (n // cfg.bn, s_slots + 1)
    else:
        args = list(tile_schedule(group_sizes, t, cfg.bm)) + xs
        kernel = functools.partial(_grouped_kernel, **kw)
        grid = (n // cfg.bn, cfg.split_k, args[0].shape[0])
    for p, s, g in weights:
        args += [p, s, jnp.reshape(g, (s_slots,)).astype(jnp.float32)]
    out_shape, aliases = jax.ShapeDtypeStruct((rows, n), x.dtype), {}
    if cfg.split_k > 1:                # + float32 partials and the zeroed per-tile counters (aliased in and out)
        counters = grid[0] * grid[2]
        out_shape = (jax.ShapeDtypeStruct((num_weights * cfg.split_k, rows, n), jnp.float32), out_shape,
                     jax.ShapeDtypeStruct((counters,), jnp.int32))
        aliases = {len(args): 2}
        args.append(jnp.zeros((counters,), jnp.int32))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="moe_gmm_swiglu" if num_weights == 2 else "moe_gmm",
    )(*args)
    out = out[1] if cfg.split_k > 1 else out
    return out[:t] if interpret else out


@functools.partial(jax.jit, static_argnames=("fmt", "config", "interpret"))
def moe_gmm(x: jax.Array, packed: jax.Array, scales: jax.Array, global_scale: jax.Array, group_sizes: jax.Array,
            *, fmt: str, config: MoeGmmConfig | None = None, interpret: bool = False) -> jax.Array:
    """Grouped y[t] = x[t] @ W[slot(t)].T with FP4 slot weights decoded in registers (fused Pallas kernel).

    Args:
        x: [T, K] bfloat16 activations, rows sorted by slot (slot 0's rows first).
        packed: uint8 [S, N, K/2]; scales: uint8 [S, N, K/bs]; global_scale: float32 [S].
        group_sizes: int32 [S], rows per slot; zeros allowed, sum <= T.
        fmt: 'nvfp4' or 'mxfp4'.
        config: tiles (default_config(T, N, K, S) if None).
        interpret: run the Pallas interpreter (CPU tests).

    Returns:
        [T, N] in x.dtype; rows past sum(group_sizes) are zero.

    Example:
        >>> y = moe_gmm(x_sorted, q.packed, q.scales, q.global_scale, group_sizes, fmt=q.fmt)
    """
    cfg = config or default_config(x.shape[0], packed.shape[1], x.shape[1], packed.shape[0])
    return _grouped_call(x, [(packed, scales, global_scale)], group_sizes, fmt=fmt, cfg=cfg, num_weights=1,
                         interpret=interpret)


@functools.partial(jax.jit, static_argnames=("fmt", "config", "interpret"))
def expert_swiglu(x: jax.Array, gate, up, down, group_sizes: jax.Array, *, fmt: str,
                  config: tuple[MoeGmmConfig, MoeGmmConfig] | None = None, interpret: bool = False) -> jax.Array:
    """SwiGLU expert MLP over rows sorted by slot, [T, D] -> [T, D]: down(silu(gate(x)) * up(x)).

    Two launches: gate and up fused (one activation tile, both weights, silu * up in float32, bf16 out), then
    down. Weights are (packed, scales, global_scale) tuples or QTensors: gate, up [S, I, D]; down [S, D, I].

    Args:
        x: [T, D] bfloat16, rows sorted by slot. group_sizes: int32 [S].
        fmt: 'nvfp4' or 'mxfp4'.
        config: (gate/up tiles, down tiles); defaults from default_config.
        interpret: run the Pallas interpreter (CPU tests).

    Returns:
        [T, D] in x.dtype; rows past sum(group_sizes) are zero.

    Example:
        >>> y = expert_swiglu(x_sorted, w_gate, w_up, w_down, group_sizes, fmt="nvfp4")   # QTensors
    """
    g, u, d = weight_parts(gate), weight_parts(up), weight_parts(down)
    t, dim = x.shape
    s_slots, inter, _ = g[0].shape
    cfg_gu, cfg_d = config or (default_config(t, inter, dim, s_slots, num_weights=2),
                               default_config(t, dim, 2 * d[0].shape[2], s_slots))
    h = _grouped_call(x, [g, u], group_sizes, fmt=fmt, cfg=cfg_gu, num_weights=2, interpret=interpret)
    return _grouped_call(h, [d], group_sizes, fmt=fmt, cfg=cfg_d, num_weights=1, interpret=interpret)

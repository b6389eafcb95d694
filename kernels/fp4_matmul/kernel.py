"""Dense FP4 matmul kernel: y[M, N] = x[M, K] @ W.T, W read as packed E2M1 bytes + block scales, never as bf16.

Pallas on the Triton lowering (deprecated since JAX 0.11 in favour of Mosaic GPU, but still supported in 0.11.2;
see bench/RESULTS.md for why this first version uses it). Each program owns an [bm, bn] output tile and a slice
of K (split-K for small M so that enough programs stream the weight): per K step it loads bn x bkh packed bytes
and their scales, decodes them in registers (decode.py), and feeds a bf16 dot with float32 accumulation. The
per-matrix global scale multiplies the accumulator once. With split-K the partial sums go to a float32
[split_k, M, N] buffer that one small XLA reduction sums. With x_pairs the kernel reads x itself (as uint32
column pairs, a bitcast) with rows past M masked, so no XLA pass pads or splits x: one launch in all (split_k 1).

This file owns tiling and launch; decode.py owns the bit-level decode; reference.py the pure-jnp twin.
"""

# M rows (tokens), N out-features, K in-features, H = K/2 packed bytes, bs block size

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsjax_kernels.fp4_matmul.decode import (DECODES, bf16_pairs, check_fmt, decode_halves, decode_tile,
                                             nibbles_to_f16_bits, pairs_to_bf16, scale_bits_to_f32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp4MatmulConfig:
    """Tile shape and launch parameters. bm, bn, bkh powers of two >= 16 (bm >= 8 with w_lhs); bkh packed bytes per
    K step.

    x_split: feed the kernel x's even and odd columns as two [M, K/2] planes (one XLA pass over x) and run two
    dots on the weight's low and high nibbles, instead of interleaving the decoded nibbles in registers.
    gemv: for small M, no matrix instruction: each program multiplies its decoded [bn, bkh] weight tile by every
    row of x with float32 multiply-adds, sums each scale block before applying its scale, and keeps x unpadded
    (bm is ignored). Needs x_split.
    decode: how a tile's nibbles become bf16: 'jnp' (decode.py's integer decode, float32 scale multiply) or 'ptx'
    (packed pairs in inline PTX, sm_90; the MMA tiles with x_split only).
    x_pairs: (with x_split, not gemv) the kernel loads x as uint32 even/odd column pairs and splits them in
    registers, masking rows past M: x is never padded or split in XLA, and the output is written unpadded.
    w_lhs: the decoded weight is the dot's left operand (acc^T [bn, bm] = W x^T, transposed once at the store) and x
    the right one, whose side of the matrix instruction may be 8 wide: bm may then be 8, so decode rows are not
    padded to 16 (kernel run 8: 1.1-1.3x faster at decode sizes). Which operand Triton then stages through shared
    memory was not inspected.
    k_reduce: how split-K partial sums are added (split_k > 1, MMA tiles): 'xla' (one XLA reduction over a float32
    [split_k, M, N] buffer, a second kernel) or 'kernel' (each program writes its partial, then counts itself in
    with an atomic on a per-tile counter; the program that arrives last adds the split_k partials in order and writes
    the output: one launch, same summation order as 'xla', so the result does not depend on arrival order).
    """

    bm: int = 16
    bn: int = 64
    bkh: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    x_split: bool = True
    gemv: bool = False
    decode: str = "jnp"
    x_pairs: bool = False
    w_lhs: bool = False
    k_reduce: str = "xla"


K_REDUCES = ("xla", "kernel")


def default_config(m: int, n: int, k: int) -> Fp4MatmulConfig:
    """Heuristic tiles: small M streams the weight with split-K (the weight as the dot's left operand, 8-row tiles up
    to M=8, 32-row tiles for M 17..32; the kernel adds the split-K partials itself), M 65..1023 uses 128-row tiles
    with split-K, large M 256-row tiles. M 9..16 and 33..64 keep kernel run 6's tiles (not re-measured since)."""
    h = k // 2
    divisors = lambda steps: [s for s in range(1, steps + 1) if steps % s == 0]
    if m == 1 and n % 16 == 0 and n // 16 >= 264 and h % 256 == 0:
        # GEMV tiles for one row of x when 16-row programs fill >= 2 waves: the fastest tiles of the H200 sweep for
        # K=2048 N=7168 (bench/RESULTS.md, kernel run 5: 8.0 us); for N=2048 (128 programs) split-K MMA tiles won
        return Fp4MatmulConfig(bn=16, bkh=256, split_k=1, num_warps=4, num_stages=3, gemv=True)
    if m <= 8 or (17 <= m <= 32 and n % 64 == 0 and h % 128 == 0):
        # w_lhs tiles (8 rows up to M=8, else 32), bn 64, and split-K summed in the kernel (k_reduce='kernel'). Kernel
        # run 9 (bench/RESULTS.md): M=8, the fastest splits leave each program <= 2-4 K steps of 128 bytes with
        # >= 224 programs: 8.6-8.8 us for both V3 shapes (run 8's XLA-summed split: 9.1-9.2); M=32, the smallest
        # split that launches >= 224 programs: 13.0 us (K=7168 N=2048, split 7) and 11.8 us (K=2048 N=7168,
        # split 2), against 14.6 / 14.8 for run 6's 16-row tiles.
        bm = 8 if m <= 8 else 32
        bn = first_fit(n, (64, 32, 16))
        bkh = first_fit(h, (128, 64, 32, 16))
        steps = h // bkh
        tiles = n // bn
        ok = (lambda s: steps // s <= 2 and tiles * s >= 224) if m <= 8 else (lambda s: tiles * s >= 224)
        split_k = next((s for s in divisors(steps) if ok(s)), steps)
        return Fp4MatmulConfig(bm=bm, bn=bn, bkh=bkh, split_k=split_k, num_warps=4, num_stages=4, decode="ptx",
                               w_lhs=True, k_reduce="kernel" if split_k > 1 else "xla")
    if m <= 64:
        # MMA tiles with the PTX decode; bn and split-K so that the weight is streamed by >= 256 programs (~2 per
        # SM), bm=16 up to M=32. Kernel run 6 (bench/RESULTS.md): the fastest of that sweep at M=8/32.
        bm = 16 if m <= 32 else max(16, 1 << (m - 1).bit_length())
        fits = [b for b in (64, 32, 16) if n % b == 0] or [16]
        bn = next((b for b in fits if n // b * 4 >= 256), fits[-1])
        bkh = first_fit(h, (128, 64, 32, 16))
        steps = h // bkh
        split_k = next((s for s in divisors(steps) if n // bn * s >= 256), steps)
        return Fp4MatmulConfig(bm=bm, bn=bn, bkh=bkh, split_k=split_k, num_warps=4, num_stages=4, decode="ptx")
    bn = first_fit(n, (128, 64, 32, 16))
    bkh = first_fit(h, (32, 16))
    if m >= 1024:
        # Prefill: 256-row tiles on interleaved x (one dot per K step) were the fastest of kernel run 6's sweep at
        # M=4096 for both shapes and formats (304-334 us against 409-456 us for 128-row tiles on split x); with the
        # weight as the dot's left operand 297 / 309 us against 330 / 335 (kernel run 8, NVFP4)
        return Fp4MatmulConfig(bm=256, bn=bn, bkh=bkh, split_k=1, num_warps=8, num_stages=3, x_split=False, w_lhs=True)
    # M 65..1023: the prefill tiles at 128 rows, split-K (summed in the kernel) until >= 128 programs run, each
    # program keeping >= 4 K steps. Kernel run 9 at M=256: 38.7 us for K=7168 N=2048 (split 4; 158 us for run 6's
    # one 32-program launch), 45.4 us for K=2048 N=7168 (split 2; 45.1 unsplit)
    tiles = n // bn * -(-m // 128)
    splits = [s for s in divisors(h // bkh) if s <= max(1, h // bkh // 4)]
    split_k = next((s for s in splits if tiles * s >= 128), splits[-1])
    return Fp4MatmulConfig(bm=128, bn=bn, bkh=bkh, split_k=split_k, num_warps=8, num_stages=3, x_split=False,
                           w_lhs=True, k_reduce="kernel" if split_k > 1 else "xla")


def first_fit(size: int, cands: tuple[int, ...]) -> int:
    """The first tile of `cands` that divides `size`, else the last (the smallest)."""
    return next((b for b in cands if size % b == 0), cands[-1])


def _check_tiles(m_pad: int, n: int, h: int, fmt: str, cfg: Fp4MatmulConfig) -> None:
    bs = check_fmt(fmt)
    if cfg.gemv and (not cfg.x_split or m_pad > GEMV_MAX_M):
        raise ValueError(f"gemv tiles need x_split and M <= {GEMV_MAX_M} (got M={m_pad}, {cfg})")
    check_layout(cfg)
    check_pow2_tiles(cfg)
    if cfg.k_reduce not in K_REDUCES:
        raise ValueError(f"k_reduce must be one of {K_REDUCES}, got {cfg.k_reduce!r}")
    if cfg.k_reduce == "kernel" and (cfg.gemv or cfg.split_k == 1):
        raise ValueError(f"k_reduce='kernel' needs split-K MMA tiles (split_k > 1, not gemv): {cfg}")
    if n % cfg.bn or h % cfg.bkh or cfg.bkh % (bs // 2) or (h // cfg.bkh) % cfg.split_k:
        raise ValueError(f"tiles {cfg} do not divide N={n}, K/2={h} (format {fmt}, block {bs})")
    assert cfg.gemv or m_pad % cfg.bm == 0


def check_layout(cfg) -> None:
    """How a config (Fp4MatmulConfig or MoeGmmConfig) reads x and decodes the weight: decode='ptx' makes bf16 halves
    for the MMA tiles with x_split (not gemv); x_pairs splits x's column pairs for those same tiles."""
    gemv = getattr(cfg, "gemv", False)
    if cfg.decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {cfg.decode!r}")
    if cfg.decode == "ptx" and (not cfg.x_split or gemv):
        raise ValueError(f"decode='ptx' needs x_split tiles without gemv ({cfg})")
    if cfg.x_pairs and (not cfg.x_split or gemv):
        raise ValueError(f"x_pairs needs x_split MMA tiles without gemv ({cfg})")


def check_pow2_tiles(cfg) -> None:
    """bm, bn, bkh powers of two >= 16 (bm >= 8 with w_lhs, where the rows are the instruction's narrow side)."""
    for name in ("bm", "bn", "bkh"):
        v = getattr(cfg, name)
        low = 8 if name == "bm" and getattr(cfg, "w_lhs", False) else 16
        if v & (v - 1) or v < low:
            raise ValueError(f"{name}={v} must be a power of two >= {low}")


GEMV_MAX_M = 16                          # one float32 accumulator tile per row of x
_NT = (((1,), (1,)), ((), ()))          # a [m, k] . b [n, k] -> [m, n]


def nt_dot(x: jax.Array, w: jax.Array, w_lhs: bool) -> jax.Array:
    """float32 x [bm, k] . w [bn, k] -> [bm, bn], or with w_lhs its transpose [bn, bm] (w the left operand)."""
    if w_lhs:
        return jax.lax.dot_general(w, x, _NT, preferred_element_type=jnp.float32)
    return jax.lax.dot_general(x, w, _NT, preferred_element_type=jnp.float32)


def split_even_odd(x: jax.Array) -> jax.Array:
    """x [..., M, K] -> [2, ..., M, K/2]: x[..., 0::2] and x[..., 1::2], the columns the low and high nibbles
    multiply."""
    xs = x.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    return jnp.moveaxis(xs, -1, 0)


def _fp4_matmul_kernel(x_ref, p_ref, s_ref, g_ref, *refs, fmt, cfg: Fp4MatmulConfig, k_steps: int, m: int,
                       interpret: bool = False):
    """Grid (N/bn, split_k, M/bm): one output tile over one K slice of k_steps steps. x_ref: [2, M, K/2] even / odd
    columns (x_split), uint32 [M, K/2] column pairs (x_pairs; rows >= m masked) or x [M, K]. refs: the output o_ref
    ([M, N], or [split_k, M, N] float32 partials for an XLA sum), or with k_reduce='kernel' (counter in, float32
    partials [split_k, M, N], output [M, N], counter out: the same zeroed int32 [tiles] buffer, aliased)."""
    bs = check_fmt(fmt)
    bm, bn, bkh = cfg.bm, cfg.bn, cfg.bkh
    sg = bkh // (bs // 2)                                       # scale groups per K step
    i_n, i_k, i_m = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n0 = i_n * bn
    m0 = i_m * bm
    h_base = i_k * (k_steps * bkh)
    row_ok = (m0 + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m                  # [bm, 1]

    def step(t, acc):
        h0 = pl.multiple_of(h_base + t * bkh, bkh)
        p = p_ref[pl.ds(n0, bn), pl.ds(h0, bkh)]                            # uint8 [bn, bkh]
        s = s_ref[pl.ds(n0, bn), pl.ds(h0 // (bs // 2), sg)]                # uint8 [bn, sg]
        if cfg.x_split:
            if cfg.x_pairs:
                words = plt.load(x_ref.at[pl.ds(m0, bm), pl.ds(h0, bkh)], mask=jnp.broadcast_to(row_ok, (bm, bkh)),
                                 other=0)                                   # uint32 [bm, bkh]
                xe, xo = pairs_to_bf16(words)
            else:
                xe = x_ref[0, pl.ds(m0, bm), pl.ds(h0, bkh)]                # bf16 [bm, bkh], x[:, 0::2]
                xo = x_ref[1, pl.ds(m0, bm), pl.ds(h0, bkh)]                # x[:, 1::2]
            lo, hi = decode_halves(p, s, fmt, xe.dtype, cfg.decode, interpret)   # bf16 [bn, bkh] each
            return acc + nt_dot(xe, lo, cfg.w_lhs) + nt_dot(xo, hi, cfg.w_lhs)
        x = x_ref[pl.ds(m0, bm), pl.ds(2 * h0, 2 * bkh)]                    # bf16 [bm, 2 bkh]
        w = decode_tile(p, s, fmt, x.dtype)                                 # bf16 [bn, 2 bkh]
        return acc + nt_dot(x, w, cfg.w_lhs)

    acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros((bn, bm) if cfg.w_lhs else (bm, bn), jnp.float32))
    acc = acc.T if cfg.w_lhs else acc
    mask = jnp.broadcast_to(row_ok, (bm, bn)) if cfg.x_pairs else None

    def put(dst, v):
        if cfg.x_pairs:
            plt.store(dst, v, mask=mask)
        else:
            dst[...] = v
    tile = (pl.ds(m0, bm), pl.ds(n0, bn))
    if cfg.k_reduce == "kernel":
        _, ws_ref, o_ref, cnt_ref = refs
        put(ws_ref.at[(i_k, *tile)], acc)

        @pl.when(count_in(cnt_ref, i_m * pl.num_programs(0) + i_n, interpret) == cfg.split_k - 1)
        def _():                       # the last of the tile's split_k programs
            total = sum_partials(ws_ref, 0, cfg.split_k, tile, mask)
            put(o_ref.at[tile], (total * g_ref[0]).astype(o_ref.dtype))
        return
    (o_ref,) = refs
    if cfg.split_k == 1:
        put(o_ref.at[tile], (acc * g_ref[0]).astype(o_ref.dtype))
    else:
        put(o_ref.at[(i_k, *tile)], acc)


def count_in(cnt_ref, index, interpret: bool) -> jax.Array:
    """In-kernel split-K, after this program wrote its partial: add 1 to the tile's counter cnt_ref[index] and return
    how many programs had arrived before (split_k - 1: this one is the last and adds the partials). The barrier
    first makes every thread's partial written before the count is released (the atomic is acq_rel, GPU scope)."""
    if not interpret:
        plt.debug_barrier()
    return plt.atomic_add(cnt_ref, (index,), jnp.int32(1))


def sum_partials(ws_ref, first: int, count: int, tile: tuple, mask) -> jax.Array:
    """ws_ref[first + i][tile] summed over i < count in that order, so the result does not depend on which program
    arrived last. Unrolled: every load in flight at once (a loop paid ~0.2 us per partial on the H200). Volatile:
    not served from L1, which may hold a line read before another SM's partial landed (the '.cg' cache modifier
    would do; jax 0.11.2's Triton lowering cannot map it: KeyError)."""
    other = None if mask is None else 0.0
    parts = [plt.load(ws_ref.at[(jnp.int32(first + i), *tile)], mask=mask, other=other, volatile=True)
             for i in range(count)]
    return functools.reduce(jnp.add, parts)


def _fp4_gemv_kernel(x_ref, p_ref, s_ref, g_ref, o_ref, *, fmt, cfg: Fp4MatmulConfig, k_steps: int, m: int):
    """Grid (N/bn, split_k). x_ref [2, M, G, bs/2] (x's even / odd columns by scale block), p_ref [N, G, bs/2],
    s_ref [N, G]: 3-D tiles so that a block's scale multiplies the sum over its bytes with broadcasts and
    reductions only (no reshape in registers)."""
    bs = check_fmt(fmt)
    half = bs // 2
    bn, sg = cfg.bn, cfg.bkh // half
    i_n, i_k = pl.program_id(0), pl.program_id(1)
    n0 = i_n * bn
    g_base = i_k * (k_steps * sg)

    def step(t, accs):
        g0 = pl.multiple_of(g_base + t * sg, sg)
        lo_bits, hi_bits = nibbles_to_f16_bits(p_ref[pl.ds(n0, bn), pl.ds(g0, sg), :])      # [bn, sg, half]
        lo = jax.lax.bitcast_convert_type(lo_bits, jnp.float16).astype(jnp.float32)
        hi = jax.lax.bitcast_convert_type(hi_bits, jnp.float16).astype(jnp.float32)
        s = scale_bits_to_f32(s_ref[pl.ds(n0, bn), pl.ds(g0, sg)], fmt)                    # [bn, sg]
        new = []
        for r in range(m):
            xe = x_ref[0, r, pl.ds(g0, sg), :].astype(jnp.float32)                          # [sg, half]
            xo = x_ref[1, r, pl.ds(g0, sg), :].astype(jnp.float32)
            block = jnp.sum(lo * xe[None] + hi * xo[None], axis=2)                          # [bn, sg]
            new.append(accs[r] + block * s)
        return tuple(new)

    accs = jax.lax.fori_loop(0, k_steps, step, tuple(jnp.zeros((bn, sg), jnp.float32) for _ in range(m)))
    for r in range(m):
        y = jnp.sum(accs[r], axis=1)                                                        # [bn]
        if cfg.split_k == 1:
            o_ref[r, pl.ds(n0, bn)] = (y * g_ref[0]).astype(o_ref.dtype)
        else:
            o_ref[i_k, r, pl.ds(n0, bn)] = y


def _launch(kernel, args, *, rows: int, n: int, grid, cfg: Fp4MatmulConfig, dtype, g, interpret: bool, name: str):
    """One pallas_call writing y [rows, N] in `dtype`, or with split-K float32 partial sums [split_k, rows, N] that one
    XLA reduction adds up and scales by the global scale g (k_reduce='kernel': the kernel adds them itself, counting
    programs in on a zeroed int32 counter per tile, passed in and aliased out)."""
    split = cfg.split_k > 1
    in_kernel = split and cfg.k_reduce == "kernel"
    partials = jax.ShapeDtypeStruct((cfg.split_k, rows, n), jnp.float32)
    out_shape, aliases = (partials if split else jax.ShapeDtypeStruct((rows, n), dtype)), {}
    if in_kernel:
        tiles = grid[0] * grid[2]
        out_shape = (partials, jax.ShapeDtypeStruct((rows, n), dtype), jax.ShapeDtypeStruct((tiles,), jnp.int32))
        aliases = {len(args): 2}
        args = (*args, jnp.zeros((tiles,), jnp.int32))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    if in_kernel:
        return out[1]
    return (out.sum(0) * g[0]).astype(dtype) if split else out


def _fp4_gemv(x, packed, scales, g, *, fmt, cfg, interpret):
    m, k = x.shape
    n, h = packed.shape
    half = check_fmt(fmt) // 2
    xs = split_even_odd(x).reshape(2, m, h // half, half)
    kernel = functools.partial(_fp4_gemv_kernel, fmt=fmt, cfg=cfg, k_steps=h // cfg.bkh // cfg.split_k, m=m)
    return _launch(kernel, (xs, packed.reshape(n, h // half, half), scales, g), rows=m, n=n,
                   grid=(n // cfg.bn, cfg.split_k), cfg=cfg, dtype=x.dtype, g=g, interpret=interpret, name="fp4_gemv")


@functools.partial(jax.jit, static_argnames=("fmt", "config", "interpret"))
def fp4_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, global_scale: jax.Array, *, fmt: str,
               config: Fp4MatmulConfig | None = None, interpret: bool = False) -> jax.Array:
    """y = x @ W.T for an FP4 weight W [N, K], decoded tile by tile in registers (fused Pallas kernel).

    Args:
        x: activations [M, K], bfloat16 (any M >= 1; rows are padded to the tile internally).
        packed: uint8 [N, K/2], element 2j in the low nibble.
        scales: uint8 [N, K/bs], raw E4M3 ('nvfp4', bs 16) or E8M0 ('mxfp4', bs 32) bits.
        global_scale: float32 [] or [1] (NVFP4's per-matrix scale; ones for MXFP4).
        fmt: 'nvfp4' or 'mxfp4'.
        config: tiles (default_config(M, N, K) if None). N, K/2 must be multiples of the tiles.
        interpret: run the Pallas interpreter (CPU tests) instead of compiling for the GPU.

    Returns:
        [M, N] in x.dtype: float32 accumulation, global scale applied to the accumulator.

    Example:
        >>> y = fp4_matmul(x, q.packed, q.scales, q.global_scale, fmt=q.fmt)     # q: dsjax.quant.QTensor
    """
    m, k = x.shape
    n, h = packed.shape
    if 2 * h != k:
        raise ValueError(f"x [M, K] = {x.shape} does not match packed [N, K/2] = {packed.shape}")
    cfg = config or default_config(m, n, k)
    m_pad = m if cfg.gemv else pl.cdiv(m, cfg.bm) * cfg.bm
    _check_tiles(m_pad, n, h, fmt, cfg)
    g = jnp.reshape(global_scale, (1,)).astype(jnp.float32)
    if cfg.gemv:
        return _fp4_gemv(x, packed, scales, g, fmt=fmt, cfg=cfg, interpret=interpret)
    # x_pairs reads x unpadded with masked rows; the interpreter clamps out-of-range slices, so it gets padded rows
    rows = m if cfg.x_pairs and not interpret else m_pad
    if rows != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    x_in = bf16_pairs(x) if cfg.x_pairs else split_even_odd(x) if cfg.x_split else x
    kernel = functools.partial(_fp4_matmul_kernel, fmt=fmt, cfg=cfg, k_steps=h // cfg.bkh // cfg.split_k, m=m,
                               interpret=interpret)
    out = _launch(kernel, (x_in, packed, scales, g), rows=rows, n=n, grid=(n // cfg.bn, cfg.split_k, m_pad // cfg.bm),
                  cfg=cfg, dtype=x.dtype, g=g, interpret=interpret, name="fp4_matmul")
    return out[:m] if rows != m else out

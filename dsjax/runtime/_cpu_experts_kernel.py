"""The numba kernel behind cpu_experts.py (imported on first use, so `import dsjax` never pays numba's import).

Nopython code over raw buffers; shapes, offsets and checks come from cpu_experts.py. Work is split over weight rows:
gate_up_rows and down_rows each take a range of rows of the active experts; `expert_rows` runs both phases over equal
ranges on numba's threads (parallel=True: its threading layer, OpenMP or TBB where present, starts the ranges without
the GIL), the calling thread among them.

The inner loop (one weight row against 1, 2 or 4 rows of x) is written in LLVM IR (`_fp4_rows_dot`), 16 packed bytes
(32 elements) per step: the bytes widened to 16 x i32 lanes, the low and high nibbles (elements 2j and 2j + 1) looked
up in the 16-entry E2M1 table held in a vector register (a variable permutation: LLVM emits vpermps, on AVX2 too), the block scales of the step's bytes broadcast to their lanes (E4M3 / E8M0 bits through a 256-entry
float table), and 16-lane float32 FMAs against x's even and odd elements, two accumulators per row of x. Plain numba
code cannot get there: it widens integer arithmetic to int64 and turns a table lookup into a gather. Measured on this
repository's AVX-512 CPU machine, one thread, V3 gate rows resident in cache: table lookup 1.6 GB/s, int64 bit decode
2.8, float arithmetic decode ~5, this ~20 (from RAM, in the whole kernel: ~9). That float decode, exact and
vectorisable, stays as the tail loop for rows whose length is not a multiple of 32 bytes. (Reading 64 bytes as 16
lanes of 4, eight nibble shifts per load and x permuted to match, halves the instructions but measured slower here: 11 GB/s from cache.)
"""

# T rows of x, A assignments (t, k) with an expert, hk packed bytes per weight row (K/2), hb bytes per scale block

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from dsjax.quant.fp4 import E2M1_VALUES

f32 = np.float32
STEP = 16                     # packed bytes per step of the IR loop (16 lanes); steps go in pairs
ROW_BLOCK = 16                # gate rows, then as many up rows: long runs of each matrix for the prefetchers

# Block scale bits -> float32: E4M3 for NVFP4 (0x7F/0xFF are NaN, as ml_dtypes decodes them), E8M0 for MXFP4
# (2^(e - 127); e = 0 is the subnormal 2^-127, 0xFF NaN), as qtensor.dequantize_np decodes them.
NVFP4_SCALES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
MXFP4_SCALES = np.append(np.ldexp(np.float32(1.0), np.arange(255) - 127), np.nan).astype(np.float32)
SCALE_TABLES = np.stack([NVFP4_SCALES, MXFP4_SCALES])          # [2, 256]: row = format code (cpu_experts.FORMATS)


@intrinsic
def _as_pointer(typingctx, address):
    """An int64 address as a void pointer (for numba.carray over a buffer that Python keeps alive)."""
    sig = types.voidptr(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return sig, codegen


def _fp4_rows_dot(hb: int, nrows: int):
    """An intrinsic (row, scale_bytes, table, xe, xo, sel, out, pairs): for r < nrows,
        out[r] = sum_j s_j (v(lo_j) xe[sel[r], j] + v(hi_j) xo[sel[r], j])   over j < 2 * STEP * pairs,
    with row uint8 [hk] (one weight row's packed bytes), scale_bytes uint8 [hk / hb], table float32 [256],
    s_j = table[scale_bytes[j // hb]] (hb = 8 for NVFP4's 16-element blocks, 16 for MXFP4's 32), xe / xo float32
    [T, >= hk] with unit inner stride, sel int64 [>= nrows], out float32 [>= nrows]. Each step of 16 bytes is decoded
    once for all nrows rows of x; two accumulators per row."""
    fast = ("fast",)

    @intrinsic
    def op(typingctx, row, scale_bytes, table, xe, xo, sel, out, pairs):
        sig = types.none(row, scale_bytes, table, xe, xo, sel, out, pairs)

        def codegen(context, builder, signature, args):
            arrays = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:7], args[:7])]
            rowp, scp, tabp, selp, outp = (arrays[k].data for k in (0, 1, 2, 5, 6))
            pairs = args[7]
            i32, i64, f = ir.IntType(32), ir.IntType(64), ir.FloatType()
            v16f, v16i = ir.VectorType(f, STEP), ir.VectorType(i32, STEP)
            lut = ir.Constant(v16f, [float(v) for v in E2M1_VALUES])
            zero = ir.Constant(v16f, [0.0] * STEP)

            def const(v, ty=i64):
                return ir.Constant(ty, v)

            def x_row(ary, r):                  # float* to row sel[r] of a 2-D float32 array
                stride = builder.extract_value(ary.strides, 0)
                offset = builder.mul(builder.load(builder.gep(selp, [const(r)])), stride)
                return builder.bitcast(builder.gep(builder.bitcast(ary.data, cgutils.voidptr_t), [offset]),
                                       f.as_pointer())

            def vec_ptr(base, step, ty):
                return builder.bitcast(builder.gep(base, [builder.mul(step, const(STEP))]), ty.as_pointer())

            x_even = [x_row(arrays[3], r) for r in range(nrows)]
            x_odd = [x_row(arrays[4], r) for r in range(nrows)]

            def decode_step(step):
                """(v(lo), v(hi)) of the step's 16 bytes, and the block scale of each lane."""
                raw = builder.load(vec_ptr(rowp, step, ir.VectorType(ir.IntType(8), STEP)), align=1)
                wide = builder.zext(raw, v16i)
                codes = (builder.and_(wide, ir.Constant(v16i, [15] * STEP)),
                         builder.lshr(wide, ir.Constant(v16i, [4] * STEP)))
                vals = []
                for c in codes:                 # lane l = lut[c[l]]: LLVM lowers this to a variable permute
                    v = ir.Constant(v16f, ir.Undefined)
                    for lane in range(STEP):
                        idx = builder.extract_element(c, const(lane, i32))
                        v = builder.insert_element(v, builder.extract_element(lut, idx), const(lane, i32))
                    vals.append(v)
                per_step = STEP // hb           # scale blocks in one step: 2 (NVFP4) or 1 (MXFP4)
                first = builder.mul(step, const(per_step))
                s = ir.Constant(ir.VectorType(f, per_step), ir.Undefined)
                for k in range(per_step):
                    bits = builder.load(builder.gep(scp, [builder.add(first, const(k))]))
                    s = builder.insert_element(s, builder.load(builder.gep(tabp, [builder.zext(bits, i64)])),
                                               const(k, i32))
                mask = ir.Constant(ir.VectorType(i32, STEP), [lane // hb for lane in range(STEP)])
                return vals, builder.shuffle_vector(s, s, mask)

            entry = builder.block
            loop = builder.append_basic_block("fp4_steps")
            done = builder.append_basic_block("fp4_done")
            builder.cbranch(builder.icmp_signed(">", pairs, const(0)), loop, done)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            i.add_incoming(const(0), entry)
            accs = [[builder.phi(v16f) for _ in range(2)] for _ in range(nrows)]
            for acc in (a for pair in accs for a in pair):
                acc.add_incoming(zero, entry)
            new = [[None, None] for _ in range(nrows)]
            for k in range(2):
                step = builder.add(builder.mul(i, const(2)), const(k))
                (w_lo, w_hi), s = decode_step(step)
                if nrows > 1:                   # scale the weights once for all rows; one row: scale its sum
                    w_lo, w_hi = builder.fmul(s, w_lo, flags=fast), builder.fmul(s, w_hi, flags=fast)
                for r in range(nrows):
                    xe_v = builder.load(vec_ptr(x_even[r], step, v16f), align=4)
                    xo_v = builder.load(vec_ptr(x_odd[r], step, v16f), align=4)
                    p = builder.fadd(builder.fmul(w_lo, xe_v, flags=fast), builder.fmul(w_hi, xo_v, flags=fast),
                                     flags=fast)
                    if nrows == 1:
                        p = builder.fmul(s, p, flags=fast)
                    new[r][k] = builder.fadd(accs[r][k], p, flags=fast)
            i_next = builder.add(i, const(1))
            i.add_incoming(i_next, loop)
            for r in range(nrows):
                for k in range(2):
                    accs[r][k].add_incoming(new[r][k], loop)
            builder.cbranch(builder.icmp_signed("<", i_next, pairs), loop, done)
            builder.position_at_end(done)
            reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f, v16f]),
                                                    "llvm.vector.reduce.fadd.v16f32")
            ends = [[builder.phi(v16f) for _ in range(2)] for _ in range(nrows)]
            for r in range(nrows):
                for k in range(2):               # zero when the loop never ran
                    ends[r][k].add_incoming(zero, entry)
                    ends[r][k].add_incoming(new[r][k], loop)
            for r in range(nrows):
                total = builder.call(reduce, [const(0.0, f), builder.fadd(ends[r][0], ends[r][1], flags=fast)],
                                     fastmath=fast)
                builder.store(total, builder.gep(outp, [const(r)]))
            return context.get_dummy_value()
        return sig, codegen
    return op


# Each decoded step serves 1, 2 or 4 rows of x.
_dot_nvfp4_1, _dot_nvfp4_2, _dot_nvfp4_4 = (_fp4_rows_dot(8, n) for n in (1, 2, 4))
_dot_mxfp4_1, _dot_mxfp4_2, _dot_mxfp4_4 = (_fp4_rows_dot(16, n) for n in (1, 2, 4))


@njit(inline="always", fastmath=True)
def _e2m1(c):
    """E2M1 code held as float32 in [0, 16) -> its value, float ops only: sign = c >= 8, m = c - 8 sign,
    |v| = max(m / 2, m - 2, 2m - 8) (exact on 0..7: 0, .5, 1, 1.5, 2, 3, 4, 6)."""
    neg = c >= f32(8)
    m = c - f32(8) if neg else c
    v = max(max(f32(0.5) * m, m - f32(2)), f32(2) * m - f32(8))
    return -v if neg else v


@njit(fastmath=True, nogil=True, cache=True)
def _main_dots(row, scale_bytes, table, hb, xe, xo, rows, out):
    """out[i] = sum over the packed bytes of `row` (a multiple of 32) of s (v(lo) xe[rows[i]] + v(hi) xo[rows[i]]):
    the IR loop, 4, 2 or 1 rows of x per pass."""
    pairs = row.shape[0] // (2 * STEP)
    count = rows.shape[0]
    i = 0
    while i < count:
        sel, o = rows[i:], out[i:]
        if count - i >= 4:
            if hb == 8:
                _dot_nvfp4_4(row, scale_bytes, table, xe, xo, sel, o, pairs)
            else:
                _dot_mxfp4_4(row, scale_bytes, table, xe, xo, sel, o, pairs)
            i += 4
        elif count - i >= 2:
            if hb == 8:
                _dot_nvfp4_2(row, scale_bytes, table, xe, xo, sel, o, pairs)
            else:
                _dot_mxfp4_2(row, scale_bytes, table, xe, xo, sel, o, pairs)
            i += 2
        else:
            if hb == 8:
                _dot_nvfp4_1(row, scale_bytes, table, xe, xo, sel, o, pairs)
            else:
                _dot_mxfp4_1(row, scale_bytes, table, xe, xo, sel, o, pairs)
            i += 1


@njit(fastmath=True, nogil=True, cache=True)
def _block_dots(buf, p_off, s_off, n_w, hk, hb, table, xe, xo, rows, out):
    """out[w, i] = W[w] . x[rows[i]] (without the global scale) for n_w consecutive weight rows whose hk packed bytes
    start at buf[p_off] and scale bytes at buf[s_off] (hk / hb per row): the IR loop over each row's whole pairs of
    steps, then the float decode over its last < 32 bytes. (Sweeping the rows in chunks so that x's part stays in
    L1 when several rows of x share a weight row measured no faster.)"""
    count = rows.shape[0]
    main = hk // (2 * STEP) * (2 * STEP)
    nb = hk // hb
    for w in range(n_w):
        row = buf[p_off + w * hk:p_off + (w + 1) * hk]      # indexed by loop counters only: numba's negative-index
        scale_bytes = buf[s_off + w * nb:s_off + (w + 1) * nb]   # wraparound check would block vector loads
        o = out[w, :count]
        _main_dots(row[:main], scale_bytes, table, hb, xe, xo, rows, o)
        tail = row[main:]
        for j in range(tail.shape[0]):
            k = main + j
            b = f32(tail[j])
            hi = np.floor(b * f32(0.0625))
            lo = b - f32(16) * hi
            s = table[scale_bytes[k // hb]]
            w_lo, w_hi = s * _e2m1(lo), s * _e2m1(hi)
            for i in range(count):
                o[i] += w_lo * xe[rows[i], k] + w_hi * xo[rows[i], k]


@njit(nogil=True, cache=True)
def _global_scale(buf, offset):
    return buf[offset:offset + 4].view(np.float32)[0]


@njit(fastmath=True, nogil=True, cache=True)
def gate_up_rows(lo, hi, xe, xo, addresses, nbytes, active, start, order, meta, tables, he, ho):
    """Phase 1 for weight rows lo <= r < hi of the active experts' gate and up (row r is row r % I of expert
    active[r // I]): h[a, n] = silu(gate[n] . x) * (up[n] . x) for the expert's assignments a (rows
    start[u]:start[u + 1] of h, in expert order); even n go to he[:, n // 2], odd n to ho."""
    n_inter, K = meta[0, 3], meta[3, 0]
    hk = xe.shape[1]
    g_all, v_all = np.empty((ROW_BLOCK, order.shape[0]), np.float32), np.empty((ROW_BLOCK, order.shape[0]), np.float32)
    hb_g, hb_u = meta[0, 6], meta[1, 6]
    table_g, table_u = tables[meta[0, 5]], tables[meta[1, 5]]
    r = lo
    while r < hi:
        u = active[r // n_inter]
        a0, count = start[u], start[u + 1] - start[u]
        buf = numba.carray(_as_pointer(addresses[u]), (nbytes,), np.uint8)
        x_rows = order[a0:a0 + count] // K
        gs_g, gs_u = _global_scale(buf, meta[0, 2]), _global_scale(buf, meta[1, 2])
        n1 = min(hi - r + r % n_inter, n_inter)               # this expert's last row in the range, plus one
        for b0 in range(r % n_inter, n1, ROW_BLOCK):          # a block of gate rows, then the same up rows
            nw = min(b0 + ROW_BLOCK, n1) - b0
            _block_dots(buf, meta[0, 0] + b0 * hk, meta[0, 1] + b0 * (hk // hb_g), nw, hk, hb_g, table_g, xe, xo,
                        x_rows, g_all)
            _block_dots(buf, meta[1, 0] + b0 * hk, meta[1, 1] + b0 * (hk // hb_u), nw, hk, hb_u, table_u, xe, xo,
                        x_rows, v_all)
            for w in range(nw):
                n = b0 + w
                for i in range(count):
                    a = gs_g * g_all[w, i]
                    h = a / (f32(1) + np.exp(-a)) * (gs_u * v_all[w, i])        # silu(gate) * up
                    if n % 2 == 0:
                        he[a0 + i, n // 2] = h
                    else:
                        ho[a0 + i, n // 2] = h
        r += n1 - r % n_inter


@njit(fastmath=True, nogil=True, cache=True)
def down_rows(lo, hi, he, ho, addresses, nbytes, active, start, order, meta, tables, y):
    """Phase 2 for weight rows lo <= r < hi of the active experts' down (row r is row r % D of expert
    active[r // D]): y[t, k, n] = down[n] . h[a] for the expert's assignments a = (t, k)."""
    d_hidden, K = meta[2, 3], meta[3, 0]
    hk, hb = he.shape[1], meta[2, 6]
    o_all = np.empty((ROW_BLOCK, order.shape[0]), np.float32)
    table = tables[meta[2, 5]]
    r = lo
    while r < hi:
        u = active[r // d_hidden]
        a0, count = start[u], start[u + 1] - start[u]
        buf = numba.carray(_as_pointer(addresses[u]), (nbytes,), np.uint8)
        h_rows = np.arange(a0, a0 + count)
        gs_d = _global_scale(buf, meta[2, 2])
        n1 = min(hi - r + r % d_hidden, d_hidden)
        for b0 in range(r % d_hidden, n1, ROW_BLOCK):
            nw = min(b0 + ROW_BLOCK, n1) - b0
            _block_dots(buf, meta[2, 0] + b0 * hk, meta[2, 1] + b0 * (hk // hb), nw, hk, hb, table, he, ho, h_rows,
                        o_all)
            for w in range(nw):
                for i in range(count):
                    flat = order[a0 + i]
                    y[flat // K, flat % K, b0 + w] = gs_d * o_all[w, i]
        r += n1 - r % d_hidden


@njit(parallel=True, nogil=True, cache=True)
def expert_rows(ranges_gu, ranges_d, xe, xo, addresses, nbytes, active, start, order, meta, tables, he, ho, y):
    """Both phases for the active experts: gate_up_rows over `ranges_gu` equal contiguous ranges of their gate/up rows
    side by side, then (the parallel loop's end is the barrier: h is complete) down_rows over `ranges_d` ranges of
    their down rows. One range per thread: numba's static schedule gives each thread one contiguous block of a loop."""
    gu = active.shape[0] * meta[0, 3]
    for c in numba.prange(ranges_gu):
        gate_up_rows(gu * c // ranges_gu, gu * (c + 1) // ranges_gu, xe, xo, addresses, nbytes, active, start, order,
                     meta, tables, he, ho)
    dd = active.shape[0] * meta[2, 3]
    for c in numba.prange(ranges_d):
        down_rows(dd * c // ranges_d, dd * (c + 1) // ranges_d, he, ho, addresses, nbytes, active, start, order, meta,
                  tables, y)

"""The numba kernel behind cpu_experts.py (imported on first use, so `import dsjax` never pays numba's import).

Everything here is nopython code over raw buffers; shapes, offsets and checks come from cpu_experts.py.

Decode, per packed byte (lanes = bytes of a weight row): the byte as float32 b, hi = floor(b / 16), lo = b - 16 hi
(the two E2M1 codes, element 2j in the low nibble), then the code's value from its float c in [0, 16) with no table:
sign = c >= 8, m = c - 8 sign, |v| = max(m / 2, m - 2, 2m - 8) (exact on 0..7: 0, .5, 1, 1.5, 2, 3, 4, 6). Float ops
only, because numba widens integer arithmetic to int64 and a table lookup becomes a gather: both keep LLVM from
16-wide vectors (measured on AVX-512, one thread: table 1.6 GB/s, int64 decode 2.8, this 4.8). The dot with the
activation's even/odd elements is one long loop per row with a float32 accumulator (fastmath: reassociated, i.e.
vectorised, sums), and the block scale comes from a per-row scratch that repeats each decoded scale over its block's
bytes (LLVM turns that into a gather + permutes, ~10% of the row's time).
"""

# T rows of x, U distinct experts (buffers), A assignments (t, k) with an expert, N out-features, HK bytes per row
# (K/2), HB bytes per scale block (block/2), NB scale blocks per row

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

f32 = np.float32

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


@njit(inline="always", fastmath=True)
def _e2m1(c):
    """E2M1 code held as float32 in [0, 16) -> its value (see the module docstring)."""
    neg = c >= f32(8)
    m = c - f32(8) if neg else c
    v = max(max(f32(0.5) * m, m - f32(2)), f32(2) * m - f32(8))
    return -v if neg else v


@njit(inline="always", fastmath=True)
def _expand_scales(buf, s_off, hb, nb, table, sx):
    """sx[j] = the float scale of packed byte j of the row whose scale bytes start at buf[s_off]."""
    for b in range(nb):
        s = table[buf[s_off + b]]
        for j in range(hb):
            sx[b * hb + j] = s


@njit(fastmath=True, nogil=True, cache=True)
def _dot1(buf, p_off, hk, sx, xe, xo):
    """One weight row (packed bytes at buf[p_off:p_off + hk], scales in sx) dotted with one activation (even, odd)."""
    acc = f32(0)
    for j in range(hk):
        b = f32(buf[p_off + j])
        hi = np.floor(b * f32(0.0625))
        lo = b - f32(16) * hi
        acc += sx[j] * (_e2m1(lo) * xe[j] + _e2m1(hi) * xo[j])
    return acc


@njit(fastmath=True, nogil=True, cache=True)
def _decode_row(buf, p_off, hk, sx, we, wo):
    """The row's scaled values, even elements to we, odd ones to wo (a row-sized scratch, for several activations)."""
    for j in range(hk):
        b = f32(buf[p_off + j])
        hi = np.floor(b * f32(0.0625))
        lo = b - f32(16) * hi
        we[j] = sx[j] * _e2m1(lo)
        wo[j] = sx[j] * _e2m1(hi)


@njit(fastmath=True, nogil=True, cache=True)
def _dot2(we, wo, xe, xo, hk):
    acc = f32(0)
    for j in range(hk):
        acc += we[j] * xe[j] + wo[j] * xo[j]
    return acc


@njit(fastmath=True, nogil=True, cache=True)
def _row_dots(buf, p_off, s_off, hk, hb, table, xe, xo, rows, count, sx, we, wo, out):
    """out[i] = W[row] . x[rows[i]] for i < count, for the weight row whose packed bytes start at buf[p_off] and
    scale bytes at buf[s_off] (without the per-matrix global scale)."""
    _expand_scales(buf, s_off, hb, hk // hb, table, sx)
    if count == 1:
        out[0] = _dot1(buf, p_off, hk, sx, xe[rows[0]], xo[rows[0]])
    else:
        _decode_row(buf, p_off, hk, sx, we, wo)
        for i in range(count):
            out[i] = _dot2(we, wo, xe[rows[i]], xo[rows[i]], hk)


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
    sx, we, wo = np.empty(hk, np.float32), np.empty(hk, np.float32), np.empty(hk, np.float32)
    g, v = np.empty(order.shape[0], np.float32), np.empty(order.shape[0], np.float32)
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
        for n in range(r % n_inter, n1):
            _row_dots(buf, meta[0, 0] + n * hk, meta[0, 1] + n * (hk // hb_g), hk, hb_g, table_g,
                      xe, xo, x_rows, count, sx, we, wo, g)
            _row_dots(buf, meta[1, 0] + n * hk, meta[1, 1] + n * (hk // hb_u), hk, hb_u, table_u,
                      xe, xo, x_rows, count, sx, we, wo, v)
            for i in range(count):
                a = gs_g * g[i]
                h = a / (f32(1) + np.exp(-a)) * (gs_u * v[i])        # silu(gate) * up
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
    sx, we, wo = np.empty(hk, np.float32), np.empty(hk, np.float32), np.empty(hk, np.float32)
    o = np.empty(order.shape[0], np.float32)
    table = tables[meta[2, 5]]
    r = lo
    while r < hi:
        u = active[r // d_hidden]
        a0, count = start[u], start[u + 1] - start[u]
        buf = numba.carray(_as_pointer(addresses[u]), (nbytes,), np.uint8)
        h_rows = np.arange(a0, a0 + count)
        gs_d = _global_scale(buf, meta[2, 2])
        n1 = min(hi - r + r % d_hidden, d_hidden)
        for n in range(r % d_hidden, n1):
            _row_dots(buf, meta[2, 0] + n * hk, meta[2, 1] + n * (hk // hb), hk, hb, table,
                      he, ho, h_rows, count, sx, we, wo, o)
            for i in range(count):
                flat = order[a0 + i]
                y[flat // K, flat % K, n] = gs_d * o[i]
        r += n1 - r % d_hidden

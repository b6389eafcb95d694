"""FP4 formats (dsjax.quant): E2M1 codes, nibble packing, NVFP4 / MXFP4 scales, QTensor, reference matmul.

Oracles: hand-written tables, ml_dtypes' float4_e2m1fn / float8 casts, XLA's own f4 bitcast, the spec's
formulas written out here (deepseek-spec.md §3.3-3.4), and weights built from known codes and scales.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsjax.quant import (
    BLOCK_SIZES,
    QTensor,
    dequantize,
    dequantize_np,
    e2m1_decode,
    e2m1_decode_jax,
    e2m1_encode,
    from_gpt_oss_mxfp4,
    from_modelopt_nvfp4,
    pack_nibbles,
    qlinear_reference,
    quantize,
    unpack_nibbles,
    unpack_nibbles_jax,
)
from dsjax.quant.mxfp4 import e8m0_scale_bits, e8m0_to_float_jax, e8m0_to_float_np

# The one table of tolerances for this file.
#   block_rel: bound on max|W - W'| / amax(block) for any block (derivations in test_round_trip_error_bound).
#   rms_rel:   regression ceiling on ||W - W'|| / ||W|| for standard-normal W (measured ~0.095 / ~0.115).
#   matmul_*:  qlinear_reference vs a float64 numpy product, as max-abs error / max |y|.
TOL = {
    "nvfp4": {"block_rel": 17 / 96 * (1 + 1e-6), "rms_rel": 0.10},
    "mxfp4": {"block_rel": 0.25 * (1 + 1e-6), "rms_rel": 0.12},
    "matmul_float32": 1e-5,
    "matmul_bfloat16": 1e-2,
}

FMTS = ["nvfp4", "mxfp4"]

# Hand-written E2M1 table (OCP MX v1.0 §5.3.3): code -> value.
E2M1_TABLE = [
    (0b0000, 0.0), (0b0001, 0.5), (0b0010, 1.0), (0b0011, 1.5),
    (0b0100, 2.0), (0b0101, 3.0), (0b0110, 4.0), (0b0111, 6.0),
    (0b1000, -0.0), (0b1001, -0.5), (0b1010, -1.0), (0b1011, -1.5),
    (0b1100, -2.0), (0b1101, -3.0), (0b1110, -4.0), (0b1111, -6.0),
]


def err_msg(actual, expected) -> str:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    diff = np.abs(a - e)
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    rel = max_abs / max(float(np.nanmax(np.abs(e))) if e.size else 0.0, 1e-300)
    bad = int(np.count_nonzero(~((a == e) | (np.isnan(a) & np.isnan(e)))))
    return f"max-abs error {max_abs:.3e}, relative {rel:.3e}, {bad}/{a.size} elements differ"


def assert_bits_equal(actual, expected):
    """Bit-exact float comparison (distinguishes -0.0 from +0.0); prints max-abs and relative error."""
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.shape == e.shape and a.dtype == e.dtype, f"{a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
    ints = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    assert np.array_equal(a.view(ints), e.view(ints)), err_msg(a, e)


def _codes_to_values(codes):
    table = {c: v for c, v in E2M1_TABLE}
    return np.vectorize(lambda c: table[int(c)], otypes=[np.float32])(codes)


# --- E2M1 codes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code,value", E2M1_TABLE)
def test_e2m1_every_code(code, value):
    expected = np.float32(value)
    assert_bits_equal(e2m1_decode(np.uint8(code)), expected)
    assert_bits_equal(np.asarray(jax.jit(e2m1_decode_jax)(jnp.uint8(code))), expected)
    assert_bits_equal(np.uint8(code).view(ml_dtypes.float4_e2m1fn).astype(np.float32), expected)
    assert int(e2m1_encode(expected)) == code


@pytest.mark.parametrize("x,code", [
    # ties: round half to the even code (deepseek-spec.md §3.3 ModelOpt `_cast_fp4`)
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),
    (-0.25, 8), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14), (-5.0, 14),
    # just off a tie
    (np.nextafter(np.float32(0.25), np.float32(1)), 1), (np.nextafter(np.float32(2.5), np.float32(9)), 5),
    (np.nextafter(np.float32(0.75), np.float32(0)), 1), (np.nextafter(np.float32(5.0), np.float32(9)), 7),
    # saturation at ±6
    (6.0, 7), (6.5, 7), (1e30, 7), (np.inf, 7), (-7.0, 15), (-np.inf, 15),
    # zeros: the input's sign bit is kept (code 8 is -0)
    (0.0, 0), (-0.0, 8), (1e-40, 0), (-1e-40, 8), (-0.1, 8),
])
def test_e2m1_encode_ties_saturation_zero(x, code):
    got = int(e2m1_encode(np.float32(x)))
    assert got == code, f"e2m1_encode({x!r}) = {got}, expected {code}"


def test_e2m1_encode_matches_ml_dtypes_sweep():
    f32 = np.float32
    grid = np.linspace(-8, 8, 160_001, dtype=f32)
    points = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=f32)
    near = np.concatenate([points, np.nextafter(points, f32(np.inf)), np.nextafter(points, f32(-np.inf))])
    logs = np.logspace(-45, 38, 4000, dtype=np.float64).astype(f32)
    x = np.concatenate([grid, near, logs, np.array([np.inf, 0.0], f32)])
    x = np.concatenate([x, -x])
    got = e2m1_encode(x)
    want = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} mismatches, first x={x[bad[:5]]} got={got[bad[:5]]} want={want[bad[:5]]}"


def test_e2m1_encode_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        e2m1_encode(np.array([1.0, np.nan], np.float32))


def test_e2m1_decode_rejects_bad_codes():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        e2m1_decode(np.array([3, 16]))


# --- nibble packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("codes,packed", [
    ([1, 2], [0x21]),                                    # element 0 in the low nibble
    ([0xF, 0x0, 0x3, 0xA, 0x8, 0x7], [0x0F, 0xA3, 0x78]),
])
def test_pack_nibbles_hand_examples(codes, packed):
    got = pack_nibbles(np.array(codes, np.uint8))
    assert got.dtype == np.uint8 and got.tolist() == packed
    assert unpack_nibbles(np.array(packed, np.uint8)).tolist() == codes
    assert np.asarray(jax.jit(unpack_nibbles_jax)(np.array(packed, np.uint8))).tolist() == codes


def test_pack_unpack_round_trip():
    codes = np.random.default_rng(0).integers(0, 16, size=(3, 5, 64), dtype=np.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 5, 32)
    assert np.array_equal(unpack_nibbles(packed), codes)
    assert np.array_equal(np.asarray(jax.jit(unpack_nibbles_jax)(packed)), codes)


def test_jax_decode_matches_xla_f4_bitcast():
    # Independent oracle: XLA's own float4_e2m1fn bitcast, low nibble first (jax-notes.md §3).
    packed = np.arange(256, dtype=np.uint8).reshape(4, 64)
    ours = jax.jit(lambda p: e2m1_decode_jax(unpack_nibbles_jax(p)))(packed)
    xla = jax.jit(lambda p: jax.lax.bitcast_convert_type(p, jnp.float4_e2m1fn).astype(jnp.float32))(packed)
    xla = xla.reshape(4, 128)                                           # [4, 64, 2] -> [4, 128]
    assert_bits_equal(np.asarray(ours), np.asarray(xla))


@pytest.mark.parametrize("codes,match", [(np.zeros(3, np.uint8), "even"), (np.array([1, 16]), r"\[0, 16\)")])
def test_pack_nibbles_errors(codes, match):
    with pytest.raises(ValueError, match=match):
        pack_nibbles(codes)


# --- quantize / dequantize round trips -------------------------------------------------------------------


def _representable(fmt, lead, n=8, k=128, seed=0):
    """A weight whose every element is code_value * block_scale * global_scale, with bytes the quantizer must
    reproduce: each block holds an element of magnitude 6 (nvfp4) or 4/6 (mxfp4); the global scale is a power
    of two and one nvfp4 block per matrix has scale 448, so the quantizer recovers the same scales."""
    rng = np.random.default_rng(seed)
    bs = BLOCK_SIZES[fmt]
    codes = rng.integers(0, 16, size=lead + (n, k // bs, bs), dtype=np.uint8)
    sign = rng.integers(0, 2, size=lead + (n, k // bs), dtype=np.uint8) << 3
    if fmt == "nvfp4":
        codes[..., 0] = sign | 7                                                   # ±6 in each block
        scale_bits = rng.integers(0x01, 0x7F, size=lead + (n, k // bs), dtype=np.uint8)   # E4M3 > 0, not NaN
        scale_bits[..., 0, 0] = 0x7E                                               # 448: sets the global amax
        global_scale = np.ldexp(np.float32(1), rng.integers(-20, 4, size=lead)).astype(np.float32)
        block = scale_bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        codes[..., 0] = sign | rng.integers(6, 8, size=sign.shape, dtype=np.uint8)  # ±4 or ±6 in each block
        scale_bits = rng.integers(2, 253, size=lead + (n, k // bs), dtype=np.uint8)   # results stay normal, finite
        global_scale = np.ones(lead, np.float32)
        block = np.ldexp(np.float32(1), scale_bits.astype(np.int32) - 127).astype(np.float32)
    vals = _codes_to_values(codes)
    w = (vals * block[..., None]) * global_scale[..., None, None, None]
    return w.reshape(lead + (n, k)), pack_nibbles(codes.reshape(lead + (n, k))), scale_bits, global_scale


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
def test_round_trip_exact_for_representable(fmt, lead):
    w, packed, scale_bits, global_scale = _representable(fmt, lead)
    q = quantize(w, fmt)
    assert q.shape == w.shape and q.global_scale.shape == lead
    assert np.array_equal(q.packed, packed), "codes differ"
    assert np.array_equal(q.scales, scale_bits), "block scales differ"
    assert_bits_equal(q.global_scale, global_scale)
    assert_bits_equal(dequantize_np(q), w)
    assert_bits_equal(np.asarray(jax.jit(dequantize, static_argnums=1)(q, jnp.float32)), w)


def _block_rel_errors(w, w_hat, bs):
    blocks = w.reshape(w.shape[:-1] + (-1, bs))
    err = np.abs(w_hat - w).reshape(blocks.shape).max(axis=-1)
    return err / np.abs(blocks).max(axis=-1)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", [(64, 512), (3, 32, 256)])
def test_round_trip_error_bound(fmt, shape):
    # Bounds, per block, on max|W - W'| / amax(block):
    #   NVFP4: the E4M3 block scale is within 2^-4 (half an ulp, 3 mantissa bits) of amax/(6 s2), so the block's
    #          scaled amax is <= 6/(1 - 2^-4) = 6.4 and each error is <= 1 scaled unit (half of E2M1's widest
    #          step, 4..6; saturation above 6 costs < 0.4), i.e. <= bs*s2 <= (1 + 2^-4) amax/6 = 17/96 amax.
    #          Holds while bs is an E4M3 normal: block amax > 2^-6/448 of the matrix amax.
    #   MXFP4: X = 2^(floor(log2 amax) - 2) puts amax/X in [4, 8); elements under 6X err <= X <= amax/4, and
    #          saturated ones (6X, 8X) err (|x| - 6X) < |x|/4. So < 1/4.
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    w *= np.exp2(rng.integers(-3, 4, size=shape[:-1] + (1,))).astype(np.float32)   # rows over a 64x range
    q = quantize(w, fmt)
    w_hat = dequantize_np(q)
    rel = _block_rel_errors(w, w_hat, q.block_size)
    bound = TOL[fmt]["block_rel"]
    worst = np.unravel_index(np.argmax(rel), rel.shape)
    assert rel.max() <= bound, f"{fmt}: block {worst} error {rel.max():.4f} > bound {bound:.4f}; {err_msg(w_hat, w)}"


@pytest.mark.parametrize("fmt", FMTS)
def test_round_trip_rms_on_normal_data(fmt):
    w = np.random.default_rng(2).standard_normal((256, 1024)).astype(np.float32)
    w_hat = dequantize_np(quantize(w, fmt))
    rms = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
    assert rms <= TOL[fmt]["rms_rel"], f"{fmt}: rms relative error {rms:.4f}; {err_msg(w_hat, w)}"


@pytest.mark.parametrize("fmt", FMTS)
def test_zero_blocks_and_zero_matrix(fmt):
    bs = BLOCK_SIZES[fmt]
    w = np.random.default_rng(3).standard_normal((2, 4, 4 * bs)).astype(np.float32)
    w[0] = 0.0                                   # an all-zero expert matrix
    w[1, 2, bs:2 * bs] = 0.0                     # an all-zero block in a non-zero matrix
    w[1, 3, :bs] = -0.0
    q = quantize(w, fmt)
    if fmt == "nvfp4":
        assert q.global_scale[0] == 1.0            # zero matrix: s2 = 1, not 0
        assert (q.scales[0] == 0x38).all() and q.scales[1, 2, 1] == 0x38 and q.scales[1, 3, 0] == 0x38  # 1.0
    else:
        assert (q.scales[0] == 0).all() and q.scales[1, 2, 1] == 0 and q.scales[1, 3, 0] == 0    # 2^-127, not 0xFF
    for w_hat in (dequantize_np(q), np.asarray(jax.jit(dequantize, static_argnums=1)(q, jnp.float32))):
        assert np.isfinite(w_hat).all()
        assert_bits_equal(w_hat[0], np.zeros_like(w[0]))                 # +0 codes
        assert (w_hat[1, 2, bs:2 * bs] == 0).all() and (w_hat[1, 3, :bs] == 0).all()


# --- scale edge cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("amax,bits", [
    (0.0, 0),                      # zero block: the smallest exponent, never 0xFF
    (1.0, 125), (4.0, 127), (6.0, 127), (7.99, 127), (8.0, 128),
    (2.0 ** -125, 0), (2.0 ** -124, 1), (2.0 ** -130, 0), (1e-45, 0),   # underflow clamps to 0
    (float(np.finfo(np.float32).max), 252),                             # largest float32 -> 2^125
])
def test_e8m0_scale_bits(amax, bits):
    assert int(e8m0_scale_bits(np.float32(amax))) == bits


def test_e8m0_decode_all_bits():
    bits = np.arange(256, dtype=np.uint8)
    want = bits.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)       # 0 -> 2^-127, 255 -> NaN
    got = e8m0_to_float_np(bits)
    assert_bits_equal(got[:255], want[:255])
    assert np.isnan(got[255])
    assert got[0] == np.float32(2.0 ** -127)
    got_jax = np.asarray(jax.jit(e8m0_to_float_jax)(bits))     # integer ops: the subnormal 2^-127 survives
    assert_bits_equal(got_jax[:255], want[:255])
    assert np.isnan(got_jax[255])


def test_mxfp4_extreme_blocks():
    big = np.finfo(np.float32).max
    w = np.zeros((2, 64), np.float32)
    w[0, :32] = (np.linspace(-1, 1, 32) * big).astype(np.float32)      # huge amax: X = 2^125
    w[0, 32:] = 2.0 ** -124 * np.linspace(-1, 1, 32, dtype=np.float32)   # tiny: X = 2^-126 (e = 1)
    w[1, :32] = 2.0 ** -130                                             # below the E8M0 range: X = 2^-127
    q = quantize(w, "mxfp4")
    assert q.scales.tolist() == [[252, 1], [0, 0]]
    w_hat = dequantize_np(q)
    assert np.isfinite(w_hat).all()
    rel = _block_rel_errors(w[:1], w_hat[:1], 32)
    assert rel.max() <= TOL["mxfp4"]["block_rel"], err_msg(w_hat, w)
    assert (w_hat[1] == 0).all()        # 2^-130 / 2^-127 = 1/8 rounds to 0: documented precision loss


def test_nvfp4_e4m3_scale_edges():
    w = np.zeros((1, 96), np.float32)
    ramp = np.linspace(0.1, 1.0, 16, dtype=np.float32)
    w[0, 0:16] = 100.0 * ramp                 # the matrix amax: scale 448 (0x7E)
    w[0, 32:48] = 100.0 * 2.0 ** -12 * ramp   # ideal scale 448 * 2^-12 = 1.75 * 2^-4: E4M3 normal (0x1E)
    w[0, 48:64] = 100.0 * 2.0 ** -16 * ramp   # ideal 3.5 * 2^-9: E4M3 subnormal, tie to even 4 * 2^-9
    w[0, 64:80] = -100.0 * 2.0 ** -22 * ramp  # ideal scale 1e-4 underflows E4M3: clamped to 2^-9, not 0
    q = quantize(w, "nvfp4")
    assert q.scales.tolist() == [[0x7E, 0x38, 0x1E, 0x04, 0x01, 0x38]]
    w_hat = dequantize_np(q)
    assert np.isfinite(w_hat).all() and (w_hat[0, 16:32] == 0).all()
    for blk in (slice(0, 16), slice(32, 48)):    # the blocks with a normal E4M3 scale obey the bound
        rel = _block_rel_errors(w[:, blk], w_hat[:, blk], 16)
        assert rel.max() <= TOL["nvfp4"]["block_rel"], err_msg(w_hat[:, blk], w[:, blk])
    assert (w_hat[0, 64:80] < 0).any(), "an underflowing block must keep some signal"
    assert_bits_equal(np.asarray(jax.jit(dequantize, static_argnums=1)(q, jnp.float32)), w_hat)


def test_nvfp4_never_nan_over_wild_ranges():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    w *= (10.0 ** rng.uniform(-30, 30, size=(16, 16, 1))).astype(np.float32).repeat(16, axis=-1).reshape(16, 256)
    q = quantize(w, "nvfp4")
    assert not ((q.scales & 0x7F) == 0x7F).any(), "E4M3 NaN scale"
    assert np.isfinite(dequantize_np(q)).all()


# --- jnp vs numpy, pytree, matmul ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", [(16, 128), (4, 8, 64)])
def test_jax_dequantize_matches_numpy(fmt, shape):
    w = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    q = quantize(w, fmt)
    ref = dequantize_np(q)
    deq = jax.jit(dequantize, static_argnums=1)
    assert_bits_equal(np.asarray(deq(q, jnp.float32)), ref)
    assert_bits_equal(np.asarray(deq(q, jnp.bfloat16)), ref.astype(jnp.bfloat16))


@pytest.mark.parametrize("fmt", FMTS)
def test_qtensor_is_a_pytree(fmt):
    w = np.random.default_rng(6).standard_normal((3, 8, 64)).astype(np.float32)
    q = quantize(w, fmt)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 3 and fmt in str(treedef)
    bs = BLOCK_SIZES[fmt]
    assert q.shape == (3, 8, 64) and q.ndim == 3
    assert q.nbytes == 3 * 8 * 32 + 3 * 8 * (64 // bs) + 3 * 4
    on_device = jax.jit(lambda t: t)(q)
    assert isinstance(on_device, QTensor) and on_device.fmt == fmt and on_device.shape == q.shape
    assert np.array_equal(np.asarray(on_device.packed), q.packed)
    expert1 = jax.tree.map(lambda a: a[1], q)              # every leaf has the expert axis first
    assert_bits_equal(dequantize_np(expert1), dequantize_np(q)[1])


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlinear_reference(fmt, dtype):
    rng = np.random.default_rng(7)
    q = quantize(rng.standard_normal((48, 128)).astype(np.float32), fmt)
    x = jnp.asarray(rng.standard_normal((2, 5, 128)), dtype)
    y = jax.jit(qlinear_reference)(x, q)
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    want = np.asarray(x, np.float64) @ dequantize_np(q).astype(np.float64).T
    diff = np.abs(np.asarray(y, np.float64) - want).max() / np.abs(want).max()
    assert diff <= TOL[f"matmul_{dtype}"], err_msg(y, want)


def test_qlinear_reference_stacked_experts():
    rng = np.random.default_rng(8)
    q = quantize(rng.standard_normal((3, 16, 64)).astype(np.float32), "nvfp4")
    x = jnp.asarray(rng.standard_normal((3, 4, 64)), jnp.float32)
    y = jax.jit(qlinear_reference)(x, q)
    want = np.einsum("etk,enk->etn", np.asarray(x, np.float64), dequantize_np(q).astype(np.float64))
    assert y.shape == (3, 4, 16)
    assert np.abs(np.asarray(y) - want).max() <= TOL["matmul_float32"] * np.abs(want).max(), err_msg(y, want)


# --- checkpoint importers --------------------------------------------------------------------------------


def _spec_nvfp4_dequant(weight_u8, weight_scale, weight_scale_2):
    """deepseek-spec.md §3.3 written out, independent of dsjax."""
    lut = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    def val(c):
        return np.where(c >> 3, -1.0, 1.0) * np.take(lut, c & 7)
    codes = np.stack([weight_u8 & 0xF, weight_u8 >> 4], axis=-1).reshape(weight_u8.shape[0], -1)
    scale = weight_scale.astype(np.float64).repeat(16, axis=-1)
    return val(codes) * scale * np.float64(weight_scale_2)


@pytest.mark.parametrize("scale_dtype", ["e4m3", "uint8"])
@pytest.mark.parametrize("s2_shape", [(), (1,)])
def test_from_modelopt_nvfp4_keeps_bytes(scale_dtype, s2_shape):
    rng = np.random.default_rng(9)
    weight = rng.integers(0, 256, size=(8, 32), dtype=np.uint8)                        # K = 64
    scale_bits = rng.integers(0, 0x7F, size=(8, 4), dtype=np.uint8)                   # no NaN
    scale = scale_bits.view(ml_dtypes.float8_e4m3fn) if scale_dtype == "e4m3" else scale_bits
    s2 = np.full(s2_shape, 0.0123, np.float32)
    q = from_modelopt_nvfp4(weight, scale, s2)
    assert q.fmt == "nvfp4" and q.shape == (8, 64) and q.global_scale.shape == ()
    assert q.packed.tobytes() == weight.tobytes() and q.scales.tobytes() == scale_bits.tobytes()
    assert q.global_scale.tobytes() == s2.tobytes()
    want = _spec_nvfp4_dequant(weight, scale_bits.view(ml_dtypes.float8_e4m3fn), s2.reshape(()))
    got = dequantize_np(q)
    assert np.abs(got - want).max() <= 1e-7 * np.abs(want).max(), err_msg(got, want)


def test_from_modelopt_round_trips_our_quantizer():
    w = np.random.default_rng(10).standard_normal((8, 64)).astype(np.float32)
    q = quantize(w, "nvfp4")
    q2 = from_modelopt_nvfp4(q.packed, q.scales.view(ml_dtypes.float8_e4m3fn), q.global_scale.reshape(1))
    assert_bits_equal(dequantize_np(q2), dequantize_np(q))


@pytest.mark.parametrize("args,match", [
    ((np.zeros((4, 8), np.int8), np.zeros((4, 1), np.uint8), np.float32(1)), "uint8"),
    ((np.zeros((4, 8), np.uint8), np.zeros((4, 2), np.uint8), np.float32(1)), "scales shape"),
    ((np.zeros((4, 8), np.uint8), np.full((4, 1), 0x7F, np.uint8), np.float32(1)), "NaN"),
    ((np.zeros((4, 8), np.uint8), np.zeros((4, 1), np.float32), np.float32(1)), "float8_e4m3fn"),
    ((np.zeros((2, 4, 8), np.uint8), np.zeros((2, 4, 1), np.uint8), np.ones(3, np.float32)), "leading axes"),
])
def test_from_modelopt_nvfp4_errors(args, match):
    with pytest.raises(ValueError, match=match):
        from_modelopt_nvfp4(*args)


def test_from_gpt_oss_mxfp4_matches_spec():
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, size=(2, 4, 3, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, size=(2, 4, 3), dtype=np.uint8)
    q = from_gpt_oss_mxfp4(blocks, scales)
    assert q.shape == (2, 4, 96)
    # transformers integrations/mxfp4.py:convert_moe_packed_tensors, as quoted in deepseek-spec.md §3.4
    lut = np.array([+0.0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    out = np.stack([lut[blocks & 0x0F], lut[blocks >> 4]], axis=-1).reshape(2, 4, 3, 32)
    out = np.ldexp(out, scales.astype(np.int32)[..., None] - 127).reshape(2, 4, 96)
    assert_bits_equal(dequantize_np(q), out)
    assert_bits_equal(np.asarray(jax.jit(dequantize, static_argnums=1)(q, jnp.float32)), out)


# --- input errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,k", [("nvfp4", 24), ("nvfp4", 8), ("mxfp4", 48), ("mxfp4", 16)])
def test_quantize_rejects_bad_k(fmt, k):
    with pytest.raises(ValueError, match=rf"K={k}.*block size {BLOCK_SIZES[fmt]}"):
        quantize(np.ones((4, k), np.float32), fmt)


@pytest.mark.parametrize("w,fmt,match", [
    (np.ones((4, 32), np.float32), "int4", "fmt"),
    (np.ones(32, np.float32), "nvfp4", r"\[\.\.\., N, K\]"),
    (np.full((4, 32), np.inf, np.float32), "mxfp4", "inf or NaN"),
])
def test_quantize_rejects_bad_input(w, fmt, match):
    with pytest.raises(ValueError, match=match):
        quantize(w, fmt)


def test_quantize_accepts_bfloat16():
    w = np.random.default_rng(12).standard_normal((4, 64)).astype(ml_dtypes.bfloat16)
    assert_bits_equal(dequantize_np(quantize(w, "nvfp4")), dequantize_np(quantize(w.astype(np.float32), "nvfp4")))

"""DeepSeek FP8 block format (dsjax.quant.fp8_block): 128x128 block dequant, ragged edges, test-side quantizer.

Oracle: a per-block loop over the formula of deepseek-spec.md §3.2, and ml_dtypes' float8_e4m3fn cast.
"""

import ml_dtypes
import numpy as np
import pytest

from dsjax.quant import dequantize_fp8_block, quantize_fp8_block

E4M3 = ml_dtypes.float8_e4m3fn

# The one table of tolerances for this file (quantize -> dequantize, per element):
#   |W - W'| <= 2^-4 |W| (half an ulp of E4M3's 3 mantissa bits) + 2^-10 * scale (half the subnormal step).
TOL = {"e4m3_rel": 2.0 ** -4, "e4m3_abs_in_scale_units": 2.0 ** -10}


def err_msg(actual, expected) -> str:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    max_abs = float(np.abs(a - e).max())
    rel = max_abs / max(float(np.abs(e).max()), 1e-300)
    return f"max-abs error {max_abs:.3e}, relative {rel:.3e}, {int(np.count_nonzero(a != e))}/{a.size} differ"


def hand_dequant(q, scale_inv, block=128):
    """W[r, c] = float(q[r, c]) * scale_inv[r // block, c // block], one block at a time."""
    out = np.zeros(q.shape, np.float32)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            rows, cols = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            out[rows, cols] = q[rows, cols].astype(np.float32) * scale_inv[bi, bj]
    return out


def _random_fp8(shape, seed):
    rng = np.random.default_rng(seed)
    q = np.clip(rng.standard_normal(shape) * 100, -448, 448).astype(E4M3)
    scale_inv = rng.uniform(1e-4, 1e-2, size=(-(-shape[0] // 128), -(-shape[1] // 128))).astype(np.float32)
    return q, scale_inv


@pytest.mark.parametrize("shape", [(200, 300), (576, 256), (128, 128), (1, 129), (256, 64)])
def test_dequant_matches_hand_loop(shape):
    q, scale_inv = _random_fp8(shape, seed=sum(shape))
    got = dequantize_fp8_block(q, scale_inv)
    want = hand_dequant(q, scale_inv)
    assert got.dtype == np.float32 and got.shape == shape
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), err_msg(got, want)


def test_dequant_ragged_edges_use_the_edge_scale():
    # [200, 300] -> scales [2, 3]; the last row band has 72 rows and the last column band 44 columns.
    q = np.ones((200, 300), E4M3)
    scale_inv = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    w = dequantize_fp8_block(q, scale_inv)
    assert w[0, 0] == 1 and w[127, 255] == 2 and w[0, 256] == 3 and w[0, 299] == 3
    assert w[128, 0] == 4 and w[199, 128] == 5 and w[199, 299] == 6


def test_dequant_accepts_raw_bytes():
    q, scale_inv = _random_fp8((130, 140), seed=1)
    assert np.array_equal(dequantize_fp8_block(q.view(np.uint8), scale_inv), dequantize_fp8_block(q, scale_inv))


@pytest.mark.parametrize("q,scale_inv,match", [
    (np.zeros((200, 300), E4M3), np.ones((2, 2), np.float32), "expected \\(2, 3\\)"),
    (np.zeros((200, 300), E4M3), np.ones((1, 3), np.float32), "expected \\(2, 3\\)"),
    (np.zeros((2, 128, 128), E4M3), np.ones((1, 1), np.float32), "2-D"),
    (np.zeros((128, 128), np.float32), np.ones((1, 1), np.float32), "float8_e4m3fn"),
])
def test_dequant_errors(q, scale_inv, match):
    with pytest.raises(ValueError, match=match):
        dequantize_fp8_block(q, scale_inv)


@pytest.mark.parametrize("shape", [(200, 300), (256, 384)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_quantize_round_trip(shape, dtype):
    rng = np.random.default_rng(2)
    w = (rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, size=(shape[0], 1)))).astype(dtype)
    q, scale_inv = quantize_fp8_block(w)
    assert q.dtype == E4M3 and scale_inv.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    w32 = w.astype(np.float32)
    # Every block reaches ±448 exactly: scale = amax / 448 (DeepSeek's scheme).
    scale_full = np.repeat(np.repeat(scale_inv, 128, 0), 128, 1)[: shape[0], : shape[1]]
    want_q = (w32 / scale_full).astype(E4M3)
    assert np.array_equal(q.view(np.uint8), want_q.view(np.uint8)), "codes differ from the ml_dtypes cast"
    w_hat = dequantize_fp8_block(q, scale_inv)
    bound = TOL["e4m3_rel"] * np.abs(w32) + TOL["e4m3_abs_in_scale_units"] * scale_full
    assert (np.abs(w_hat - w32) <= bound * (1 + 1e-6)).all(), err_msg(w_hat, w32)


def test_quantize_zero_block_and_amax():
    w = np.zeros((130, 260), np.float32)
    w[0, 0] = -3.0
    w[129, 259] = 7.0
    q, scale_inv = quantize_fp8_block(w)
    f32 = np.float32
    want = np.array([[f32(3) / f32(448), 1, 1], [1, 1, f32(7) / f32(448)]], f32)   # zero blocks: scale 1
    assert np.array_equal(scale_inv, want), err_msg(scale_inv, want)
    assert float(q[0, 0]) == -448 and float(q[129, 259]) == 448
    w_hat = dequantize_fp8_block(q, scale_inv)
    assert np.isfinite(w_hat).all()
    assert np.allclose(w_hat, w, rtol=1e-6, atol=0), err_msg(w_hat, w)


@pytest.mark.parametrize("w,match", [
    (np.ones((2, 3, 4), np.float32), "2-D"),
    (np.array([[1.0, np.nan]], np.float32), "inf or NaN"),
])
def test_quantize_errors(w, match):
    with pytest.raises(ValueError, match=match):
        quantize_fp8_block(w)

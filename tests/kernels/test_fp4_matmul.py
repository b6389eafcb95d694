"""Dense FP4 matmul kernel: decode helpers and the reference on CPU (bit-exact against dsjax's numpy oracle),
the kernel in Pallas interpret mode on CPU, and the compiled kernel against the reference on the GPU."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsjax.quant.fp4 import E2M1_VALUES
from dsjax.quant.mxfp4 import e8m0_to_float_np
from dsjax_kernels.fp4_matmul import (Fp4MatmulConfig, decode_tile, dequantize_reference, fp4_matmul,
                                      fp4_matmul_reference, nibbles_to_f16_bits, scale_bits_to_f32)
from dsjax_kernels.fp4_matmul.decode import decode_tile_halves, decode_tile_halves_ptx_emulated
from fp4_cases import (assert_kernel_close, dequant_oracle, fresh_rng, poison_device_memory,
                       random_fp4)

FMTS = ["nvfp4", "mxfp4"]


def test_nibble_decode_every_byte():
    b = np.arange(256, dtype=np.uint8)
    lo, hi = nibbles_to_f16_bits(jnp.asarray(b))
    to_val = lambda bits: np.asarray(bits).view(np.float16).astype(np.float64) * 2.0**14
    np.testing.assert_array_equal(to_val(lo), E2M1_VALUES[b & 15])
    np.testing.assert_array_equal(to_val(hi), E2M1_VALUES[b >> 4])
    np.testing.assert_array_equal(np.signbit(to_val(lo)), b & 8 > 0)      # -0 keeps its sign


def test_scale_decode_every_code():
    e4m3 = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)  # all but the two NaNs
    got = np.asarray(scale_bits_to_f32(jnp.asarray(e4m3), "nvfp4")) / 2.0**14
    np.testing.assert_array_equal(got, e4m3.view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    e8m0 = np.arange(241, dtype=np.uint8)                                   # documented exact range
    got = np.asarray(scale_bits_to_f32(jnp.asarray(e8m0), "mxfp4")).astype(np.float64) / 2.0**14
    np.testing.assert_array_equal(got, e8m0_to_float_np(e8m0).astype(np.float64))


@pytest.mark.parametrize("fmt", FMTS)
def test_decode_tile_is_exact_dequantization(fmt):
    rng, seed = fresh_rng()
    packed, scales, gs = random_fp4(rng, (32, 256), fmt)
    w = np.asarray(decode_tile(jnp.asarray(packed), jnp.asarray(scales), fmt, jnp.float32))
    np.testing.assert_array_equal(w * gs, dequant_oracle(packed, scales, gs, fmt), err_msg=f"seed {seed}")  # f32 product
    wb = np.asarray(decode_tile(jnp.asarray(packed), jnp.asarray(scales), fmt), np.float32)   # bf16: still exact
    np.testing.assert_array_equal(wb, w, err_msg=f"seed {seed}")


@pytest.mark.parametrize("fmt", FMTS)
def test_ptx_decode_is_exact_on_every_byte_and_scale(fmt):
    """The packed-pair PTX decode's bit logic (its instructions emulated one by one in jnp: prmt, shifts, masks,
    lop3, two bf16x2 multiplies) against decode_tile_halves (itself exact, above): every byte value with every
    scale code whose products are normal numbers and that decode_tile_halves takes exactly (E4M3: all but NaN;
    E8M0: 2^-125 .. 2^113, where the reference's float32 scale times 2^14 saturates above)."""
    codes = (np.array([b for b in range(128) if b != 0x7F], np.uint8) if fmt == "nvfp4"
             else np.arange(2, 241, dtype=np.uint8))
    per_block = 8 if fmt == "nvfp4" else 16                          # packed bytes per scale
    packed = np.tile(np.arange(256, dtype=np.uint8), (len(codes), 1))  # row r: all 256 bytes under code r
    scales = np.repeat(codes[:, None], 256 // per_block, axis=1)
    want = decode_tile_halves(jnp.asarray(packed), jnp.asarray(scales), fmt)
    got = decode_tile_halves_ptx_emulated(jnp.asarray(packed), jnp.asarray(scales), fmt)
    for w, g, half in zip(want, got, ("low", "high")):
        w, g = np.asarray(w, np.float32), np.asarray(g, np.float32)
        np.testing.assert_array_equal(g, w, err_msg=f"{half} nibbles")
        np.testing.assert_array_equal(np.signbit(g), np.signbit(w), err_msg=f"{half} nibbles: sign of zero")


@pytest.mark.parametrize("fmt", FMTS)
def test_reference_matches_oracle(fmt):
    rng, seed = fresh_rng()
    packed, scales, gs = random_fp4(rng, (48, 128), fmt)
    w = dequant_oracle(packed, scales, gs, fmt)
    np.testing.assert_array_equal(np.asarray(dequantize_reference(packed, scales, gs, fmt=fmt, dtype=jnp.float32)), w)
    x = rng.standard_normal((7, 128)).astype(np.float32)
    y = fp4_matmul_reference(jnp.asarray(x), packed, scales, gs, fmt=fmt)
    assert_kernel_close(y, x.astype(np.float64) @ w.T, "reference_vs_oracle_f32", f"{fmt} seed {seed}")


INTERPRET_CASES = [   # (M, N, K, config): M off the tile, split-K, several M tiles
    (5, 64, 256, Fp4MatmulConfig(bm=16, bn=32, bkh=64, split_k=2)),
    (20, 32, 128, Fp4MatmulConfig(bm=16, bn=16, bkh=32)),
    (1, 48, 512, Fp4MatmulConfig(bn=16, bkh=128, gemv=True)),                # FMA path: M=1, three N tiles
    (5, 32, 512, Fp4MatmulConfig(bn=16, bkh=64, split_k=2, gemv=True)),      # M off any tile, split-K
    (5, 64, 256, Fp4MatmulConfig(bm=16, bn=32, bkh=64, split_k=2, decode="ptx")),   # PTX decode (emulated)
    (8, 64, 256, None),                 # the default tiles: small M -> split-K MMA tiles with the PTX decode
    (5, 64, 256, Fp4MatmulConfig(bm=16, bn=32, bkh=64, x_pairs=True)),   # x read as column pairs, rows masked
    (20, 32, 256, Fp4MatmulConfig(bm=16, bn=16, bkh=32, split_k=2, x_pairs=True, decode="ptx")),
    (1100, 128, 64, None),              # large M -> 256-row tiles on interleaved x, the last one ragged
    # the weight as the dot's left operand (acc transposed at the store); bm=8 only there
    (5, 64, 256, Fp4MatmulConfig(bm=8, bn=32, bkh=64, split_k=2, w_lhs=True, decode="ptx")),
    (20, 32, 256, Fp4MatmulConfig(bm=16, bn=16, bkh=32, x_split=False, w_lhs=True)),
    (3, 32, 256, Fp4MatmulConfig(bm=8, bn=16, bkh=32, x_pairs=True, w_lhs=True)),
    # split-K partials added in the kernel by the tile's last program (atomic counter), several M and N tiles
    (20, 64, 512, Fp4MatmulConfig(bm=16, bn=32, bkh=64, split_k=4, k_reduce="kernel", decode="ptx")),
    (5, 32, 256, Fp4MatmulConfig(bm=8, bn=16, bkh=32, split_k=2, x_pairs=True, w_lhs=True, k_reduce="kernel")),
]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k,cfg", INTERPRET_CASES)
def test_kernel_interpret(fmt, m, n, k, cfg):
    rng, seed = fresh_rng()
    packed, scales, gs = random_fp4(rng, (n, k), fmt)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = fp4_matmul(x, packed, scales, gs, fmt=fmt, config=cfg, interpret=True)
    ref = fp4_matmul_reference(x, packed, scales, gs, fmt=fmt)
    assert_kernel_close(y, ref, "kernel_vs_reference", f"interpret {fmt} M={m} N={n} K={k} seed {seed}")


def test_bad_tiles_rejected():
    x = jnp.zeros((4, 256), jnp.bfloat16)
    p, s = jnp.zeros((48, 128), jnp.uint8), jnp.zeros((48, 16), jnp.uint8)
    with pytest.raises(ValueError, match="do not divide"):
        fp4_matmul(x, p, s, jnp.ones(()), fmt="nvfp4", config=Fp4MatmulConfig(bn=32))
    with pytest.raises(ValueError, match="fmt"):
        fp4_matmul(x, p, s, jnp.ones(()), fmt="fp4")
    with pytest.raises(ValueError, match="gemv"):
        fp4_matmul(jnp.zeros((17, 256), jnp.bfloat16), p, s, jnp.ones(()), fmt="nvfp4",
                   config=Fp4MatmulConfig(bn=16, bkh=32, gemv=True))
    for bad in (dict(decode="ptx", x_split=False), dict(decode="ptx", gemv=True), dict(decode="asm")):
        with pytest.raises(ValueError, match="decode"):
            fp4_matmul(x, p, s, jnp.ones(()), fmt="nvfp4", config=Fp4MatmulConfig(bn=16, bkh=32, **bad))
    for bad in (dict(x_pairs=True, x_split=False), dict(x_pairs=True, gemv=True)):
        with pytest.raises(ValueError, match="x_pairs"):
            fp4_matmul(x, p, s, jnp.ones(()), fmt="nvfp4", config=Fp4MatmulConfig(bn=16, bkh=32, **bad))
    with pytest.raises(ValueError, match="bfloat16"):
        fp4_matmul(x.astype(jnp.float32), p, s, jnp.ones(()), fmt="nvfp4",
                   config=Fp4MatmulConfig(bn=16, bkh=32, x_pairs=True))
    with pytest.raises(ValueError, match="bm=8 must be a power of two >= 16"):       # bm=8 needs w_lhs
        fp4_matmul(x, p, s, jnp.ones(()), fmt="nvfp4", config=Fp4MatmulConfig(bm=8, bn=16, bkh=32))
    for bad in (dict(k_reduce="atomic"), dict(k_reduce="kernel"), dict(k_reduce="kernel", split_k=2, gemv=True)):
        with pytest.raises(ValueError, match="k_reduce"):
            fp4_matmul(x, p, s, jnp.ones(()), fmt="nvfp4", config=Fp4MatmulConfig(bn=16, bkh=32, **bad))


GPU_CASES = [   # (M, N, K, config or None for the default heuristic)
    (1, 64, 256, None), (3, 2048, 7168, None), (8, 7168, 2048, None), (17, 256, 1024, None),
    (32, 2048, 7168, None), (64, 512, 2048, None), (100, 384, 1536, None), (257, 2048, 512, None),
    (1000, 1024, 7168, None), (4096, 256, 2048, None), (4096, 2048, 7168, None),   # M=4096: 256-row prefill tiles
    (9, 512, 1024, Fp4MatmulConfig(bm=16, bn=16, bkh=16, split_k=4)),
    (40, 512, 2048, Fp4MatmulConfig(bm=64, bn=128, bkh=64, split_k=1, num_warps=8)),
    (70, 512, 2048, Fp4MatmulConfig(bm=32, bn=64, bkh=64, split_k=2, x_split=False)),
    (300, 256, 1024, Fp4MatmulConfig(bm=128, bn=64, bkh=32, num_warps=4, num_stages=2)),
    (1, 2048, 7168, Fp4MatmulConfig(bn=16, bkh=256, gemv=True)), (1, 7168, 2048, None),  # the default: GEMV
    (3, 7168, 2048, Fp4MatmulConfig(bn=32, bkh=256, num_stages=4, gemv=True)),
    (8, 2048, 7168, Fp4MatmulConfig(bn=16, bkh=128, split_k=2, num_stages=4, gemv=True)),
    (16, 512, 2048, Fp4MatmulConfig(bn=64, bkh=128, num_warps=8, gemv=True)),
    (1, 2048, 7168, Fp4MatmulConfig(bm=16, bn=32, bkh=128, split_k=4, num_stages=4, decode="ptx")),
    (8, 7168, 2048, Fp4MatmulConfig(bm=16, bn=32, bkh=128, split_k=4, num_stages=4, decode="ptx")),
    (300, 256, 1024, Fp4MatmulConfig(bm=128, bn=64, bkh=32, num_warps=4, num_stages=2, decode="ptx")),
    (4096, 256, 2048, Fp4MatmulConfig(bm=128, bn=128, bkh=32, num_warps=8, decode="ptx")),
    # x read in the kernel as column pairs (rows past M masked, output unpadded): one launch with split_k 1
    (1, 2048, 7168, Fp4MatmulConfig(bm=16, bn=16, bkh=256, num_stages=4, x_pairs=True, decode="ptx")),
    (3, 7168, 2048, Fp4MatmulConfig(bm=16, bn=32, bkh=128, num_stages=4, x_pairs=True, decode="ptx")),
    (21, 512, 2048, Fp4MatmulConfig(bm=16, bn=32, bkh=64, split_k=2, x_pairs=True)),
    (40, 2048, 7168, Fp4MatmulConfig(bm=64, bn=32, bkh=128, split_k=4, x_pairs=True, decode="ptx")),
    # the weight as the dot's left operand: 8-row tiles, split-K, column pairs, prefill tiles on interleaved x
    (1, 2048, 7168, Fp4MatmulConfig(bm=8, bn=32, bkh=128, split_k=4, num_stages=4, w_lhs=True, decode="ptx")),
    (8, 7168, 2048, Fp4MatmulConfig(bm=8, bn=64, bkh=128, split_k=4, num_stages=4, w_lhs=True, decode="ptx")),
    (13, 2048, 7168, Fp4MatmulConfig(bm=16, bn=32, bkh=128, split_k=4, num_stages=4, w_lhs=True)),
    (3, 7168, 2048, Fp4MatmulConfig(bm=8, bn=32, bkh=128, num_stages=4, x_pairs=True, w_lhs=True, decode="ptx")),
    (300, 256, 1024, Fp4MatmulConfig(bm=128, bn=64, bkh=32, num_warps=4, w_lhs=True, decode="ptx")),
    (4096, 2048, 7168, Fp4MatmulConfig(bm=256, bn=128, bkh=32, num_warps=8, x_split=False, w_lhs=True)),
    # split-K sums in the kernel (the tile's last program adds the partials): decode, column pairs, mid-size M
    (8, 2048, 7168, Fp4MatmulConfig(bm=8, bn=64, bkh=128, split_k=14, num_stages=4, w_lhs=True, decode="ptx",
                                    k_reduce="kernel")),
    (1, 7168, 2048, Fp4MatmulConfig(bm=8, bn=64, bkh=64, split_k=16, num_stages=4, w_lhs=True, decode="ptx",
                                    k_reduce="kernel")),
    (5, 2048, 7168, Fp4MatmulConfig(bm=8, bn=32, bkh=128, split_k=7, num_stages=4, x_pairs=True, w_lhs=True,
                                    decode="ptx", k_reduce="kernel")),
    (200, 2048, 7168, Fp4MatmulConfig(bm=64, bn=64, bkh=128, split_k=4, w_lhs=True, decode="ptx", k_reduce="kernel")),
]


@pytest.mark.gpu
class TestFp4MatmulGpu:
    @pytest.mark.parametrize("fmt", FMTS)
    @pytest.mark.parametrize("m,n,k,cfg", GPU_CASES, ids=[
        f"{m}-{n}-{k}-{i}" + ("-w_lhs" if c and c.w_lhs else "") + ("-kred" if c and c.k_reduce == "kernel" else "")
        for i, (m, n, k, c) in enumerate(GPU_CASES)])
    def test_kernel_vs_reference(self, fmt, m, n, k, cfg):
        rng, seed = fresh_rng()
        packed, scales, gs = (jnp.asarray(a) for a in random_fp4(rng, (n, k), fmt))
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        ref = fp4_matmul_reference(x, packed, scales, gs, fmt=fmt)
        for run in range(2):                       # fresh poison before each run
            poison_device_memory()
            y = fp4_matmul(x, packed, scales, gs, fmt=fmt, config=cfg)
            assert_kernel_close(y, ref, "kernel_vs_reference", f"{fmt} M={m} N={n} K={k} {cfg} run {run} seed {seed}")
        if m * n * k <= 2**31:
            oracle = np.asarray(x, np.float64) @ dequant_oracle(packed, scales, gs, fmt).T
            assert_kernel_close(y, oracle, "kernel_vs_oracle", f"{fmt} M={m} N={n} K={k} vs f64 oracle seed {seed}")

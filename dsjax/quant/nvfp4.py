"""NVFP4 block scaling: E4M3 scale per 16 elements plus an FP32 global scale per matrix.

Owns the NVFP4 quantization arithmetic, following NVIDIA ModelOpt's export (deepseek-spec.md §3.3,
`modelopt/torch/quantization/qtensor/nvfp4_tensor.py`):

    s2 = amax(W) / (6 * 448)                        per matrix; shape [...] for W [..., N, K]
    bs = e4m3(amax(W[n, 16b:16b+16]) / (6 * s2))     per block of 16 along K (the input axis)
    q  = e2m1(W / (bs * s2))                         round-to-nearest-even, saturating at ±6
    W' = val(q) * float(bs) * s2

Edge cases, where we depart from ModelOpt only to avoid its inf/NaN:
- an all-zero matrix gets s2 = 1.0 (the formula gives 0, which would make 1/s2 infinite);
- s2 is clamped below at the smallest normal float32, so matrices with amax < ~3e-35 lose precision;
- an all-zero block gets bs = 1.0 (E4M3 0x38) and +0 codes, as in ModelOpt;
- a non-zero block whose ideal scale underflows E4M3 gets the smallest subnormal 2^-9 (0x01) rather than 0,
  so its elements still quantize (ModelOpt would divide by zero there).
The layout (packed bytes, raw scale bits) lives in qtensor.py; this file returns arrays only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsjax.quant.fp4 import E2M1_MAX, e2m1_encode, pack_nibbles

NVFP4_BLOCK = 16
E4M3_MAX = 448.0
_E4M3_ONE = 0x38            # bits of 1.0 in float8_e4m3fn
_E4M3_MIN_SUBNORMAL = 0x01  # 2^-9


def nvfp4_global_scale(w: np.ndarray) -> np.ndarray:
    """Per-matrix FP32 scale s2 = amax / (6 * 448) over the last two axes of w [..., N, K] -> float32 [...].

    All-zero matrices get 1.0; s2 is at least the smallest normal float32.
    """
    amax = np.max(np.abs(w), axis=(-2, -1)).astype(np.float32)
    s2 = amax / np.float32(E2M1_MAX * E4M3_MAX)
    s2 = np.maximum(s2, np.finfo(np.float32).tiny)
    return np.where(amax > 0, s2, np.float32(1.0)).astype(np.float32)


def e4m3_block_scale_bits(block_amax: np.ndarray, global_scale: np.ndarray) -> np.ndarray:
    """E4M3 bits of bs = e4m3(block_amax / (6 * s2)) (round-to-nearest-even cast).

    Args:
        block_amax: float32 [..., N, K/16], non-negative.
        global_scale: float32 [...], broadcast over the last two axes.

    Returns:
        uint8 [..., N, K/16]: zero blocks -> 1.0 (0x38); underflowing non-zero blocks -> 2^-9 (0x01).
        Never NaN: the ideal scale is <= 448 by construction and clipped there against float32 rounding.
    """
    ideal = block_amax / (np.float32(E2M1_MAX) * global_scale[..., None, None])
    ideal = np.minimum(ideal, np.float32(E4M3_MAX))
    bits = ideal.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    bits = np.where(bits == 0, np.uint8(_E4M3_MIN_SUBNORMAL), bits)
    return np.where(block_amax == 0, np.uint8(_E4M3_ONE), bits).astype(np.uint8)


def e4m3_to_float_np(bits: np.ndarray) -> np.ndarray:
    """Raw float8_e4m3fn bits (uint8) to float32 (numpy)."""
    return np.asarray(bits, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def e4m3_to_float_jax(bits: jax.Array) -> jax.Array:
    """Raw float8_e4m3fn bits (uint8) to float32 (jnp, jit-able)."""
    return jax.lax.bitcast_convert_type(jnp.asarray(bits, jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)


def quantize_nvfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize w [..., N, K] (finite float32, K % 16 == 0) to NVFP4 arrays.

    Returns:
        (packed uint8 [..., N, K/2], scale_bits uint8 [..., N, K/16] (E4M3 bits), global_scale float32 [...]).
    """
    s2 = nvfp4_global_scale(w)
    blocks = w.reshape(w.shape[:-1] + (w.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK))   # [..., N, K/16, 16]
    bits = e4m3_block_scale_bits(np.max(np.abs(blocks), axis=-1), s2)
    # Same order as ModelOpt: the divisor bs * s2 is rounded to float32 once, then divides.
    divisor = e4m3_to_float_np(bits) * s2[..., None, None]
    codes = e2m1_encode(blocks / divisor[..., None])
    return pack_nibbles(codes.reshape(w.shape)), bits, s2

"""E2M1 (FP4) elements: the 4-bit code, its rounding, and two-per-byte packing.

Owns the element format shared by NVFP4 and MXFP4 (OCP Microscaling v1.0 §5.3.3; deepseek-spec.md §3.3-3.4):
code = sign << 3 | magnitude index, magnitudes [0, 0.5, 1, 1.5, 2, 3, 4, 6], no inf/NaN. Packing puts element 2j
in the low nibble and 2j+1 in the high nibble (ModelOpt `nvfp4_tensor.py`, gpt-oss `_blocks`). It does not own
block scales (nvfp4.py, mxfp4.py) or the weight container (qtensor.py).

Encoding is numpy only (it runs in the converter); decoding has a numpy version (a 16-entry table, the oracle)
and a jnp version (integer bit ops, no gather) for jitted dequantization and as the model for GPU kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Value of each of the 16 codes; index = code. Code 8 is -0.0.
E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
E2M1_VALUES = np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])
E2M1_MAX = 6.0

# Round-to-nearest-even on the code: a magnitude exactly between two neighbours goes to the even index.
# Midpoints and the index pair they separate: 0.25 (0|1), 0.75 (1|2), 1.25 (2|3), 1.75 (3|4), 2.5 (4|5),
# 3.5 (5|6), 5 (6|7). Ties at 0.75, 1.75, 3.5 round up (">="), the others down (">"). This is ModelOpt's
# `_cast_fp4` (searchsorted + bump on its odd bounds [0.75, 1.75, 3.5]) and ml_dtypes' float4_e2m1fn cast.
# (deepseek-spec.md §3.3 lists the bumped ties as 0.75/1.75/2.5; 2.5 is a typo: RNE sends it down to 2.0.)
_TIE_DOWN_MIDPOINTS = (0.25, 1.25, 2.5, 5.0)
_TIE_UP_MIDPOINTS = (0.75, 1.75, 3.5)


def e2m1_encode(x) -> np.ndarray:
    """Round real values to E2M1 codes (numpy).

    Round-to-nearest, ties to the even code; magnitudes above 6 (including inf) saturate to ±6. The sign bit
    of the input is kept, so -0.0 and negative values that round to zero give code 8 (-0); this matches
    `x.astype(ml_dtypes.float4_e2m1fn)` bit for bit. Values are rounded as float32.

    Args:
        x: array-like of floats, any shape.

    Returns:
        uint8 codes in [0, 16), same shape.

    Raises:
        ValueError: if `x` holds NaN (E2M1 has no NaN; ml_dtypes would silently give -0).

    Example:
        >>> e2m1_encode([0.75, -5.0, 7.0])
        array([ 2, 14,  7], dtype=uint8)
    """
    x = np.asarray(x, dtype=np.float32)
    if np.isnan(x).any():
        raise ValueError("e2m1_encode: input holds NaN, which E2M1 cannot represent")
    a = np.abs(x)
    idx = np.zeros(x.shape, dtype=np.uint8)
    for m in _TIE_DOWN_MIDPOINTS:
        idx += a > np.float32(m)
    for m in _TIE_UP_MIDPOINTS:
        idx += a >= np.float32(m)
    idx |= np.signbit(x).astype(np.uint8) << 3
    return idx


def e2m1_decode(codes) -> np.ndarray:
    """E2M1 codes to float32 values with the plain 16-entry table (numpy; the test oracle).

    Args:
        codes: integer array-like with values in [0, 16).

    Returns:
        float32 array of the same shape; code 8 decodes to -0.0.
    """
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(f"e2m1_decode: codes must lie in [0, 16), got range [{codes.min()}, {codes.max()}]")
    return E2M1_VALUES[codes]


def e2m1_decode_jax(codes: jax.Array) -> jax.Array:
    """E2M1 codes to float32 with integer bit ops (jnp; jit-able, fuses into the consumer, no gather).

    Magnitude index m >= 2 is a normal float: exponent 126 + (m >> 1), mantissa bit m & 1, i.e. float32 bits
    (126 << 23) + (m << 22). m == 1 is the subnormal 0.5 (bits 126 << 23) and m == 0 is zero. The code's bit 3
    becomes the float32 sign bit. Only the low 4 bits of each code are read.

    Args:
        codes: integer array, any shape.

    Returns:
        float32 array of the same shape, bit-identical to `e2m1_decode`.
    """
    c = jnp.asarray(codes).astype(jnp.uint32)
    m = c & 7
    bits = jnp.where(m >= 2, (126 << 23) + (m << 22), jnp.where(m == 1, jnp.uint32(126 << 23), jnp.uint32(0)))
    bits = bits | (((c >> 3) & 1) << 31)
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32), jnp.float32)


def pack_nibbles(codes) -> np.ndarray:
    """Pack 4-bit codes two per byte along the last axis: element 2j low nibble, 2j+1 high nibble.

    Args:
        codes: integer array [..., K] with values in [0, 16); K even.

    Returns:
        uint8 [..., K/2].

    Example:
        >>> pack_nibbles([1, 2])     # low nibble 1, high nibble 2
        array([33], dtype=uint8)
    """
    codes = np.asarray(codes)
    if codes.ndim == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: last axis must have even length, got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(f"pack_nibbles: codes must lie in [0, 16), got range [{codes.min()}, {codes.max()}]")
    codes = codes.astype(np.uint8, copy=False)
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_nibbles(packed) -> np.ndarray:
    """Inverse of `pack_nibbles` (numpy): uint8 [..., K/2] -> uint8 codes [..., K]."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[..., 0::2])
    np.right_shift(packed, 4, out=out[..., 1::2])
    return out


def unpack_nibbles_jax(packed: jax.Array) -> jax.Array:
    """Inverse of `pack_nibbles` (jnp, jit-able): uint8 [..., K/2] -> uint8 codes [..., K]."""
    packed = jnp.asarray(packed, dtype=jnp.uint8)
    pairs = jnp.stack([packed & 0x0F, packed >> 4], axis=-1)          # [..., K/2, 2], low nibble first
    return pairs.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))

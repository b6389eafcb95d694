"""FP4 decode helpers that run both inside the Pallas kernels and as plain jnp (CPU tests).

Owns the in-register decode of one weight tile: packed E2M1 bytes (element 2j in the low nibble) and raw
block-scale bits (E4M3 per 16 for 'nvfp4', E8M0 per 32 for 'mxfp4') to a bf16 tile in natural K order.
It does not own the global (per-matrix) scale: kernels apply it to the f32 accumulator, once per output.

The nibble decode is integer-only (Hopper has no FP4 conversion): a code s|e1 e0|m placed at float16 bits
15 and 11..9 is the float16 number e2m1 * 2^-14 (m alone, e = 0, lands on the f16 subnormal 2^-15 = 0.5 * 2^-14,
and f16 subnormals convert exactly); the 2^14 is folded into the block scale. val * scale is exact in bf16
(2 significant bits times 4 for E4M3 or 1 for E8M0), so the decoded tile equals the dequantized weight
before the global scale, bit for bit.
"""

# N rows (out-features), H packed bytes along K (= K/2), G scale groups in a tile, bs block size

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK_SIZES = {"nvfp4": 16, "mxfp4": 32}
_F16_DECODE_BIAS = 16384.0          # 2^14: undoes the f16 placement of the nibble


def check_fmt(fmt: str) -> int:
    """Block size of `fmt`; raises ValueError for an unknown format."""
    if fmt not in BLOCK_SIZES:
        raise ValueError(f"fmt must be one of {sorted(BLOCK_SIZES)}, got {fmt!r}")
    return BLOCK_SIZES[fmt]


def nibbles_to_f16_bits(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 codes [..., H] -> (low, high) uint16 float16 bit patterns, each the value e2m1 * 2^-14.

    Low nibble: sign bit 3 -> bit 15, magnitude bits 2..0 -> bits 11..9; high nibble likewise from bits 7, 6..4.
    """
    p = packed.astype(jnp.uint16)
    lo = ((p & 0x8) << 12) | ((p & 0x7) << 9)
    hi = ((p & 0x80) << 8) | ((p & 0x70) << 5)
    return lo, hi


def scale_bits_to_f32(bits: jax.Array, fmt: str) -> jax.Array:
    """Raw block-scale bits (uint8) -> float32 scale times 2^14 (the nibble decode's bias folded in).

    nvfp4: E4M3 through a float8 bitcast (exact). mxfp4: E8M0 e is 2^(e-127); times 2^14 that is the float32 with
    exponent field e + 14 for every e <= 240 (e = 0 included, no subnormal case); larger e (scales >= 2^114,
    never seen in real weights) saturate to inf, and the NaN code 0xFF is not distinguished.
    """
    if fmt == "nvfp4":
        s = jax.lax.bitcast_convert_type(bits.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)
        return s * _F16_DECODE_BIAS
    check_fmt(fmt)
    e = jnp.minimum(bits.astype(jnp.uint32) + 14, 255)
    return jax.lax.bitcast_convert_type(e << 23, jnp.float32)


def decode_tile_halves(packed: jax.Array, scale_bits: jax.Array, fmt: str,
                       dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """One weight tile as its even and odd K columns: packed uint8 [N, H], scale bits uint8 [N, 2H/bs] ->
    (W[:, 0::2], W[:, 1::2]), each [N, H] in `dtype` (no interleave: the kernels pair them with x's even and odd
    columns instead, which saves the register shuffle of a join).
    """
    bs = check_fmt(fmt)
    n, h = packed.shape
    g = scale_bits.shape[-1]
    assert g * (bs // 2) == h, (packed.shape, scale_bits.shape, fmt)
    lo_bits, hi_bits = nibbles_to_f16_bits(packed)
    lo = jax.lax.bitcast_convert_type(lo_bits, jnp.float16).astype(jnp.float32)
    hi = jax.lax.bitcast_convert_type(hi_bits, jnp.float16).astype(jnp.float32)
    s = scale_bits_to_f32(scale_bits, fmt)                                            # [N, G]
    s = jnp.broadcast_to(s[:, :, None], (n, g, bs // 2)).reshape(n, h)               # byte j -> block j // (bs/2)
    return (lo * s).astype(dtype), (hi * s).astype(dtype)


def decode_tile(packed: jax.Array, scale_bits: jax.Array, fmt: str, dtype=jnp.bfloat16) -> jax.Array:
    """One weight tile: packed uint8 [N, H] and scale bits uint8 [N, 2H/bs] -> [N, 2H] in `dtype`.

    Equals dequantize() without the global scale. Written with ops the Pallas Triton lowering accepts
    (bitwise ops, same-width bitcasts, broadcast, reshape, a 2-way stack on the last axis).
    """
    lo, hi = decode_tile_halves(packed, scale_bits, fmt, dtype)
    n, h = packed.shape
    return jnp.stack([lo, hi], axis=-1).reshape(n, 2 * h)                             # low nibble first

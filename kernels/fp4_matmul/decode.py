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


def _per_byte(block_values: jax.Array, h: int) -> jax.Array:
    """[N, G] per scale block -> [N, H] per packed byte (byte j belongs to block j // (H / G))."""
    n, g = block_values.shape
    return jnp.broadcast_to(block_values[:, :, None], (n, g, h // g)).reshape(n, h)


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
    h = packed.shape[1]
    g = scale_bits.shape[-1]
    assert g * (bs // 2) == h, (packed.shape, scale_bits.shape, fmt)
    lo_bits, hi_bits = nibbles_to_f16_bits(packed)
    lo = jax.lax.bitcast_convert_type(lo_bits, jnp.float16).astype(jnp.float32)
    hi = jax.lax.bitcast_convert_type(hi_bits, jnp.float16).astype(jnp.float32)
    s = _per_byte(scale_bits_to_f32(scale_bits, fmt), h)                              # byte j -> block j // (bs/2)
    return (lo * s).astype(dtype), (hi * s).astype(dtype)


def decode_tile(packed: jax.Array, scale_bits: jax.Array, fmt: str, dtype=jnp.bfloat16) -> jax.Array:
    """One weight tile: packed uint8 [N, H] and scale bits uint8 [N, 2H/bs] -> [N, 2H] in `dtype`.

    Equals dequantize() without the global scale. Written with ops the Pallas Triton lowering accepts
    (bitwise ops, same-width bitcasts, broadcast, reshape, a 2-way stack on the last axis).
    """
    lo, hi = decode_tile_halves(packed, scale_bits, fmt, dtype)
    n, h = packed.shape
    return jnp.stack([lo, hi], axis=-1).reshape(n, 2 * h)                             # low nibble first


# ---- packed-pair decode in PTX (decode="ptx") ------------------------------------------------------------------
# One asm instance takes four packed bytes (one 32-bit register) and the four bytes' block scales (bf16, two
# registers) and returns four bf16 values (two registers) for either the low or the high nibbles. It spreads bytes
# 0,1 (then 2,3) into the two 16-bit lanes of a register (prmt), places each nibble's sign at bit 15 and its three
# magnitude bits at bits 8..6 of its lane (shift, and, lop3), which is the bf16 number e2m1 * 2^-126 (code 1, 0.5,
# is the bf16 subnormal 2^-127), then multiplies the lane pair by 2^126 and by the scales (mul.rn.bf16x2; both
# products are exact, as e2m1 * scale has at most 6 significant bits). About 3.5 instructions per weight against
# ~8 for decode_tile_halves (convert, float32 multiply and round per element).

_PTX_HALF = {   # nibble -> (shift that puts its sign bit at bit 15, shift that puts its magnitude at bits 8..6)
    "lo": (12, 6),
    "hi": (8, 2),
}
_BF16X2_2P126 = 0x7E807E80          # 2^126 in both bf16 lanes
_SIGN_BITS, _MAG_BITS = 0x80008000, 0x01C001C0


def _ptx_half_asm(half: str) -> str:
    s_sign, s_mag = _PTX_HALF[half]
    pair = """
    prmt.b32 t, $2, z, {sel};
    shl.b32 a, t, {s_sign};
    shl.b32 b, t, {s_mag};
    and.b32 b, b, {mag};
    lop3.b32 a, a, b, m, 0xEC;
    mul.rn.bf16x2 a, a, k;
    mul.rn.bf16x2 ${out}, a, ${scale};"""
    body = "".join(pair.format(sel=sel, s_sign=s_sign, s_mag=s_mag, mag=hex(_MAG_BITS), out=out, scale=scale) for sel, out, scale in (("0x4140", 0, 3), ("0x4342", 1, 4)))
    return ("{\n    .reg .b32 t, a, b, z, k, m;\n    mov.b32 z, 0;\n    mov.b32 k, " + hex(_BF16X2_2P126) + ";"
            + "\n    mov.b32 m, " + hex(_SIGN_BITS) + ";" + body + "\n}")


def scale_bits_to_bf16(bits: jax.Array, fmt: str) -> jax.Array:
    """Raw block-scale bits (uint8) -> the bf16 scale, exact (E4M3 has 4 significant bits; E8M0 2^(e-127) is a bf16
    power of two, e = 0 the subnormal 2^-127; the NaN code 0xFF is not distinguished)."""
    if fmt == "nvfp4":
        return jax.lax.bitcast_convert_type(bits.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.bfloat16)
    check_fmt(fmt)
    e = bits.astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(jnp.where(e == 0, jnp.uint16(0x40), e << 7), jnp.bfloat16)


def decode_tile_halves_ptx(packed: jax.Array, scale_bits: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
    """decode_tile_halves in bf16 with the packed-pair PTX decode (inside a Pallas Triton kernel on an sm_90 GPU;
    on the CPU use decode_tile_halves_ptx_emulated, the same bit logic in jnp)."""
    from jax.experimental.pallas import triton as plt
    check_fmt(fmt)
    n, h = packed.shape
    s = _per_byte(scale_bits_to_bf16(scale_bits, fmt), h)
    out = jax.ShapeDtypeStruct((n, h), jnp.bfloat16)
    lo, = plt.elementwise_inline_asm(_ptx_half_asm("lo"), args=[packed, s], constraints="=r,=r,r,r,r", pack=4,
                                     result_shape_dtypes=[out])
    hi, = plt.elementwise_inline_asm(_ptx_half_asm("hi"), args=[packed, s], constraints="=r,=r,r,r,r", pack=4,
                                     result_shape_dtypes=[out])
    return lo, hi


def _bf16_parts(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bf16 bit patterns (uint32, one per lane) -> (sign bit, integer magnitude significand, power of two): value =
    (-1)^sign * sig * 2^exp, subnormals included (decoded in integers: a CPU's float unit may flush them to zero)."""
    e = (u >> 7) & 0xFF
    sig = jnp.where(e == 0, u & 0x7F, (u & 0x7F) | 0x80).astype(jnp.int32)
    return (u >> 15) & 1, sig, jnp.maximum(e.astype(jnp.int32), 1) - 134         # 127 bias + 7 fraction bits


def _bf16x2_mul(a: jax.Array, b: jax.Array) -> jax.Array:
    """mul.rn.bf16x2 on uint32 lane pairs, for products that bf16 holds exactly (those of the decode: a nibble's
    2 significant bits times a power of two or a scale's 4): the product of the integer significands, scaled, with
    the sign (of zero too) the XOR of the signs."""
    out = []
    for shift in (0, 16):
        na, sa, ea = _bf16_parts((a >> shift) & 0xFFFF)
        nb, sb, eb = _bf16_parts((b >> shift) & 0xFFFF)
        mag = jnp.ldexp((sa * sb).astype(jnp.float32), ea + eb).astype(jnp.bfloat16)
        bits = jax.lax.bitcast_convert_type(mag, jnp.uint16).astype(jnp.uint32)
        out.append(bits | ((na ^ nb) << 15))
    return out[0] | (out[1] << 16)


def decode_tile_halves_ptx_emulated(packed: jax.Array, scale_bits: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array]:
    """The PTX decode's instructions, one by one, in jnp on uint32 words (four bytes each, as one asm instance sees
    them): the CPU tests hold this to decode_tile_halves on every byte and scale code, and the interpreter runs it
    in place of the asm."""
    check_fmt(fmt)
    n, h = packed.shape
    words = packed.astype(jnp.uint32).reshape(n, h // 4, 4)
    s16 = jax.lax.bitcast_convert_type(_per_byte(scale_bits_to_bf16(scale_bits, fmt), h), jnp.uint16)
    s16 = s16.astype(jnp.uint32)
    s16 = s16.reshape(n, h // 4, 4)
    k = jnp.uint32(_BF16X2_2P126)
    halves = []
    for half in ("lo", "hi"):
        s_sign, s_mag = _PTX_HALF[half]
        regs = []
        for b0, b1 in ((0, 1), (2, 3)):                       # prmt 0x4140 / 0x4342: bytes b0, b1 -> lanes 0, 1
            t = words[..., b0] | (words[..., b1] << 16)
            a = t << s_sign                                   # uint32: bits shifted past 31 drop, as in shl.b32
            b = (t << s_mag) & jnp.uint32(_MAG_BITS)
            a = (a & jnp.uint32(_SIGN_BITS)) | b              # lop3 0xEC: (a & c) | b
            a = _bf16x2_mul(a, k)
            regs.append(_bf16x2_mul(a, s16[..., b0] | (s16[..., b1] << 16)))
        lanes = jnp.stack([regs[0] & 0xFFFF, regs[0] >> 16, regs[1] & 0xFFFF, regs[1] >> 16], -1)
        halves.append(jax.lax.bitcast_convert_type(lanes.astype(jnp.uint16), jnp.bfloat16).reshape(n, h))
    return halves[0], halves[1]


DECODES = ("jnp", "ptx")


def bf16_pairs(x: jax.Array) -> jax.Array:
    """bf16 x [..., K] -> uint32 [..., K/2], each word one (even, odd) column pair, the even one in the low half:
    a bitcast (no copy), so a kernel can read x's even and odd columns with full-width loads (pairs_to_bf16)."""
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"bf16 pairs need bfloat16 activations, got {x.dtype}")
    return jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), jnp.uint32)


def pairs_to_bf16(words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 column pairs (bf16_pairs) -> (even columns, odd columns) in bf16, each the shape of `words`."""
    lo = jax.lax.bitcast_convert_type((words & 0xFFFF).astype(jnp.uint16), jnp.bfloat16)
    hi = jax.lax.bitcast_convert_type((words >> 16).astype(jnp.uint16), jnp.bfloat16)
    return lo, hi


def decode_halves(packed: jax.Array, scale_bits: jax.Array, fmt: str, dtype, decode: str,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """A kernel's tile decode by name: 'jnp' (decode_tile_halves) or 'ptx' (decode_tile_halves_ptx; bf16 only; under
    the Pallas interpreter its jnp emulation runs instead)."""
    if decode == "jnp":
        return decode_tile_halves(packed, scale_bits, fmt, dtype)
    if decode != "ptx":
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"decode='ptx' makes bfloat16 tiles, not {jnp.dtype(dtype)}")
    if interpret:
        return decode_tile_halves_ptx_emulated(packed, scale_bits, fmt)
    return decode_tile_halves_ptx(packed, scale_bits, fmt)

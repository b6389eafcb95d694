"""MXFP4 block scaling: one E8M0 power-of-two scale per 32 elements (OCP Microscaling Formats v1.0).

Owns the MXFP4 quantization arithmetic (OCP MX v1.0 §6.3; deepseek-spec.md §3.4):

    X  = 2^(floor(log2(amax(block))) - 2)            2 = emax of E2M1; stored as E8M0 bits e = log2(X) + 127
    q  = e2m1(W / X)                                 round-to-nearest-even, saturating at ±6
    W' = val(q) * 2^(e - 127)

E8M0 has no zero and 0xFF is NaN, so the stored exponent is clamped to [0, 254]: an all-zero block gets e = 0
(X = 2^-127; its codes are all +0 so it decodes to 0), and blocks with amax < 2^-125 share that smallest scale
(their elements may round to zero). Finite float32 input never needs more than e = 252. Note that 2^-127 is a
float32 subnormal, which XLA on CPU flushes to zero: such blocks decode to 0 under jit (see qtensor.py).
The layout lives in qtensor.py; this file returns arrays only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.quant.fp4 import e2m1_encode, pack_nibbles

MXFP4_BLOCK = 32
E8M0_BIAS = 127
E8M0_MAX_BITS = 254        # 0xFF is NaN
_E2M1_EMAX = 2


def e8m0_scale_bits(block_amax: np.ndarray) -> np.ndarray:
    """E8M0 bits of X = 2^(floor(log2(amax)) - 2), clamped to [0, 254]; amax == 0 -> 0.

    Args:
        block_amax: non-negative finite floats, any shape.

    Returns:
        uint8, same shape.
    """
    block_amax = np.asarray(block_amax, dtype=np.float32)
    _, exp2 = np.frexp(block_amax)             # amax = f * 2^exp2 with f in [0.5, 1): floor(log2 amax) = exp2 - 1
    biased = (exp2.astype(np.int32) - 1 - _E2M1_EMAX) + E8M0_BIAS
    biased = np.clip(biased, 0, E8M0_MAX_BITS)
    return np.where(block_amax > 0, biased, 0).astype(np.uint8)


def e8m0_to_float_np(bits: np.ndarray) -> np.ndarray:
    """E8M0 bits (uint8) to float32 2^(e - 127) (numpy; e = 0 gives the subnormal 2^-127, 0xFF gives NaN)."""
    bits = np.asarray(bits, dtype=np.uint8)
    exps = np.minimum(bits, E8M0_MAX_BITS).astype(np.int32) - E8M0_BIAS     # 255 would overflow; NaN below
    out = np.ldexp(np.float32(1.0), exps).astype(np.float32)
    return np.where(bits == 0xFF, np.float32(np.nan), out)


def e8m0_to_float_jax(bits: jax.Array) -> jax.Array:
    """E8M0 bits (uint8) to float32 (jnp, jit-able) with integer ops only (no float8_e8m0fnu support needed).

    e in 1..254 is the float32 with exponent field e (bits e << 23); e = 0 is the subnormal 2^-127 (bits 1 << 22),
    where the plain `e << 23` trick would give 0; 0xFF is NaN.
    """
    e = jnp.asarray(bits, jnp.uint8).astype(jnp.uint32)
    f32_bits = jnp.where(e == 0, jnp.uint32(1 << 22), e << 23)
    f32_bits = jnp.where(e == 0xFF, jnp.uint32(0x7FC00000), f32_bits)
    return jax.lax.bitcast_convert_type(f32_bits, jnp.float32)


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize w [..., N, K] (finite float32, K % 32 == 0) to MXFP4 arrays.

    Returns:
        (packed uint8 [..., N, K/2], scale_bits uint8 [..., N, K/32] (E8M0 bits)).
    """
    blocks = w.reshape(w.shape[:-1] + (w.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK))   # [..., N, K/32, 32]
    bits = e8m0_scale_bits(np.max(np.abs(blocks), axis=-1))
    # W / X as ldexp by -(e - 127): exact, except quotients below 2^-126 (float32 subnormal), which E2M1
    # rounds to 0 anyway.
    scaled = np.ldexp(blocks, (E8M0_BIAS - bits.astype(np.int32))[..., None])
    codes = e2m1_encode(scaled)
    return pack_nibbles(codes.reshape(w.shape)), bits

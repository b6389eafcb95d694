"""Pure-jnp references for the FP4 kernels: dequantize the whole weight, then one XLA dot.

The same signatures as the kernels; `dsjax.ops` runs these when fusion is off, and the GPU tests hold the
kernels to them. The decode here goes through XLA's float4_e2m1fn type (a bitcast of the packed bytes), which
is independent of the kernels' integer decode in decode.py.
"""

# M rows (tokens), N out-features, K in-features, bs block size, ... leading axes (expert slots)

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax_kernels.fp4_matmul.decode import check_fmt


def block_scales_reference(scale_bits: jax.Array, fmt: str) -> jax.Array:
    """Raw scale bits uint8 [...] -> float32 (E4M3 for 'nvfp4', E8M0 = 2^(e-127) for 'mxfp4', 0xFF NaN)."""
    check_fmt(fmt)
    bits = jnp.asarray(scale_bits, jnp.uint8)
    if fmt == "nvfp4":
        return jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn).astype(jnp.float32)
    e = bits.astype(jnp.uint32)
    f32_bits = jnp.where(e == 0, jnp.uint32(1 << 22), e << 23)
    f32_bits = jnp.where(e == 0xFF, jnp.uint32(0x7FC00000), f32_bits)
    return jax.lax.bitcast_convert_type(f32_bits, jnp.float32)


def dequantize_reference(packed: jax.Array, scales: jax.Array, global_scale: jax.Array, *, fmt: str,
                         dtype=jnp.bfloat16) -> jax.Array:
    """packed uint8 [..., N, K/2], scales uint8 [..., N, K/bs], global_scale f32 [...] -> W [..., N, K] in `dtype`.

    (val * block_scale) * global_scale in float32, one cast at the end: the order of `dsjax.quant.dequantize`.
    """
    bs = check_fmt(fmt)
    packed = jnp.asarray(packed, jnp.uint8)
    k = 2 * packed.shape[-1]
    vals = jax.lax.bitcast_convert_type(packed, jnp.float4_e2m1fn).astype(jnp.float32)   # [..., N, K/2, 2]
    vals = vals.reshape(packed.shape[:-1] + (k // bs, bs))                               # low nibble first
    w = vals * block_scales_reference(scales, fmt)[..., None]
    w = w * jnp.asarray(global_scale, jnp.float32)[..., None, None, None]
    return w.reshape(packed.shape[:-1] + (k,)).astype(dtype)


def fp4_matmul_reference(x: jax.Array, packed: jax.Array, scales: jax.Array, global_scale: jax.Array, *,
                         fmt: str, config=None) -> jax.Array:
    """y = x @ W.T for an FP4 weight W [N, K]: dequantize to x.dtype, dot with float32 accumulation.

    Args:
        x: activations [M, K].
        packed, scales, global_scale: the weight (uint8 [N, K/2], uint8 [N, K/bs], float32 [] or [1]).
        fmt: 'nvfp4' or 'mxfp4'.
        config: ignored (the kernel's tile config; kept so both functions take the same arguments).

    Returns:
        [M, N] in x.dtype.

    Example:
        >>> y = fp4_matmul_reference(x, q.packed, q.scales, q.global_scale, fmt=q.fmt)
    """
    del config
    w = dequantize_reference(packed, scales, jnp.reshape(global_scale, ()), fmt=fmt, dtype=x.dtype)
    return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)

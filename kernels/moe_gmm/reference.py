"""Pure-jnp references for the grouped FP4 expert matmuls: dequantize every slot, then `lax.ragged_dot`.

Same signatures as kernel.py. Rows past sum(group_sizes) come out as zeros, as in `lax.ragged_dot`.
"""

# T token rows (sorted by slot), S expert slots, N out-features, K in-features, I intermediate

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax_kernels.fp4_matmul.reference import dequantize_reference


def weight_parts(w) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(packed, scales, global_scale) of a weight given as that tuple or as an object with those attributes
    (e.g. `dsjax.quant.QTensor`)."""
    if isinstance(w, (tuple, list)):
        packed, scales, global_scale = w
        return packed, scales, global_scale
    return w.packed, w.scales, w.global_scale


def _ragged_dims() -> jax.lax.RaggedDotDimensionNumbers:
    # lhs [T, K] ragged on T; rhs [S, N, K] grouped on S, contracted on K.
    return jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def moe_gmm_reference(x: jax.Array, packed: jax.Array, scales: jax.Array, global_scale: jax.Array,
                      group_sizes: jax.Array, *, fmt: str, config=None) -> jax.Array:
    """Grouped y[t] = x[t] @ W[slot(t)].T over rows sorted by slot.

    Args:
        x: [T, K] activations, rows of slot 0 first, then slot 1, ...
        packed, scales, global_scale: the slot weights, uint8 [S, N, K/2], uint8 [S, N, K/bs], float32 [S].
        group_sizes: int32 [S], rows per slot (zeros allowed; sum <= T).
        fmt: 'nvfp4' or 'mxfp4'.
        config: ignored (the kernel's tiles).

    Returns:
        [T, N] in x.dtype; rows past sum(group_sizes) are zero.
    """
    del config
    w = dequantize_reference(packed, scales, global_scale, fmt=fmt, dtype=x.dtype)
    y = jax.lax.ragged_dot_general(x, w, group_sizes.astype(jnp.int32), _ragged_dims(),
                                   preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def expert_swiglu_reference(x: jax.Array, gate, up, down, group_sizes: jax.Array, *, fmt: str,
                            config=None) -> jax.Array:
    """SwiGLU expert MLP over rows sorted by slot: down(silu(gate(x)) * up(x)), [T, D] -> [T, D].

    gate, up: weights [S, I, D]; down: [S, D, I]; each a (packed, scales, global_scale) tuple or a QTensor.
    Mirrors `dsjax.ops.expert_mlp` (gate and up rounded to x.dtype before the activation).
    """
    del config
    g = moe_gmm_reference(x, *weight_parts(gate), group_sizes, fmt=fmt)
    u = moe_gmm_reference(x, *weight_parts(up), group_sizes, fmt=fmt)
    return moe_gmm_reference(jax.nn.silu(g) * u, *weight_parts(down), group_sizes, fmt=fmt)

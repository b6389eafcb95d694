"""Op dispatch: the one place the model reaches matmul implementations.

Each op takes weights that are either plain arrays (bf16/f32, [out, in] like HF nn.Linear) or FP4 `QTensor`s.
For FP4 weights the ops run the pure-jnp references (dequantize, then dot); the fused Pallas kernels in
`dsjax_kernels` plug in here, behind `compute_config.enable_fusion`, and nothing else will import them.
"""

# B batch, T tokens, D in-features, O out-features, E experts (or GPU slots), I intermediate, A assignments

from __future__ import annotations

import jax
import jax.numpy as jnp


def _is_quant(w) -> bool:
    from dsjax.quant import QTensor
    return isinstance(w, QTensor)


def materialize(w, dtype) -> jax.Array:
    """A dense [.., out, in] array of `w` in `dtype` (dequantizing FP4). For small weights used in reshaped form
    (MLA's kv_b absorption); never for experts in a hot path."""
    if _is_quant(w):
        from dsjax.quant import dequantize
        return dequantize(w, dtype)
    return w.astype(dtype)


def linear(x: jax.Array, w) -> jax.Array:
    """y = x @ w.T for w [O, D]; float32 accumulation, result in x.dtype."""
    if _is_quant(w):
        from dsjax.quant import qlinear_reference
        return qlinear_reference(x, w)
    y = jnp.einsum("...d,od->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _ragged_dims() -> jax.lax.RaggedDotDimensionNumbers:
    # lhs [A, D] ragged on A; rhs [E, O, D] grouped on E, contracted on D ([out, in] weights, no transpose).
    return jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def grouped_linear(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """Rows of x [A, D] sorted by group; group g multiplies w[g].T ([E, O, D]) -> [A, O] in x.dtype."""
    dense = materialize(w, x.dtype)
    y = jax.lax.ragged_dot_general(x, dense, group_sizes, _ragged_dims(), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def expert_mlp(x_sorted: jax.Array, w_gate, w_up, w_down, group_sizes: jax.Array) -> jax.Array:
    """SwiGLU expert MLP over token rows sorted by expert: [A, D] -> [A, D] (spec §2.7)."""
    g = grouped_linear(x_sorted, w_gate, group_sizes)
    u = grouped_linear(x_sorted, w_up, group_sizes)
    return grouped_linear(jax.nn.silu(g) * u, w_down, group_sizes)

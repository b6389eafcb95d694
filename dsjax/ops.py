"""Op dispatch: the one place the model reaches matmul implementations.

Each op takes weights that are either plain arrays (bf16/f32, [out, in] like HF nn.Linear) or FP4 `QTensor`s.
For FP4 weights the ops run the fused Pallas kernels of `dsjax_kernels` when fusion is on (`with fusion(True)`
around tracing: `compute_config.enable_fusion`), the backend is a GPU, activations are bf16 and the shapes fit the
kernel's tiles; otherwise the pure-jnp references (dequantize, then dot). Nothing else imports the kernels.
"""

# B batch, T tokens, D in-features, O out-features, E experts (or GPU slots), I intermediate, A assignments

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

_FUSION = contextvars.ContextVar("dsjax_enable_fusion", default=False)


@contextlib.contextmanager
def fusion(enabled: bool):
    """Choose kernels (True) or references (False) for the ops traced inside. The choice is made at trace time, so
    jitted callers must key their cache on it (the LayerPrograms own one set of executables per setting)."""
    token = _FUSION.set(bool(enabled))
    try:
        yield
    finally:
        _FUSION.reset(token)


def fp4_path(x: jax.Array, *weights) -> str:
    """'kernel' or 'reference': which implementation an FP4 op traced now would use."""
    if not (_FUSION.get() and jax.default_backend() == "gpu" and x.dtype == jnp.bfloat16):
        return "reference"
    return "kernel" if all(_is_quant(w) for w in weights) else "reference"


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


def precision(*arrays) -> jax.lax.Precision | None:
    """HIGHEST for float32 operands: GPUs otherwise run float32 dots as TF32 (10-bit mantissa; measured on the
    H200: 1e-3 relative logit error against transformers instead of 1e-6). None (the default) for bf16."""
    return jax.lax.Precision.HIGHEST if any(a.dtype == jnp.float32 for a in arrays) else None


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with float32 accumulation. XLA's CPU runtime has no bf16 x bf16 -> f32 dot with batch dimensions,
    so on the CPU low-precision operands are widened first (same result, more CPU work)."""
    if jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=precision(a, b))


# Rows above which a dense FP4 linear runs dequantize-then-XLA-dot instead of the fused kernel. Measured on the H100
# (bench/RESULTS.md, kernels run 9, V3 shapes K=7168 N=2048 and K=2048 N=7168): the kernel wins at M <= 256 (38 vs
# 51 us, 45 vs 49 us), the reference at M = 4096 (206 vs 296 us, 208 vs 308 us); the fitted crossovers are ~730 and
# ~390 rows. Grouped expert matmuls keep the kernel at every size (5-14x the reference there).
DENSE_KERNEL_MAX_ROWS = 512


def dense_path(rows: int) -> str:
    """'kernel' or 'reference' for a dense FP4 linear of `rows` rows on the kernel path (prefill's large M goes to
    XLA's dot of the dequantized weight, which runs tensor cores faster than the kernel there)."""
    return "kernel" if rows <= DENSE_KERNEL_MAX_ROWS else "reference"


def linear(x: jax.Array, w) -> jax.Array:
    """y = x @ w.T for w [O, D]; float32 accumulation, result in x.dtype."""
    if _is_quant(w):
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        if w.packed.ndim == 2 and fp4_path(x, w) == "kernel" and dense_path(rows) == "kernel":
            from dsjax_kernels.fp4_matmul import fp4_matmul
            try:
                y = fp4_matmul(x.reshape(-1, x.shape[-1]), w.packed, w.scales, w.global_scale, fmt=w.fmt)
                return y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)
            except ValueError:        # shapes off the kernel's tiles: the reference is always right
                pass
        from dsjax.quant import qlinear_reference
        return qlinear_reference(x, w)
    y = jnp.einsum("...d,od->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32,
                   precision=precision(x))
    return y.astype(x.dtype)


def _ragged_dims() -> jax.lax.RaggedDotDimensionNumbers:
    # lhs [A, D] ragged on A; rhs [E, O, D] grouped on E, contracted on D ([out, in] weights, no transpose).
    return jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def grouped_linear(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """Rows of x [A, D] sorted by group; group g multiplies w[g].T ([E, O, D]) -> [A, O] in x.dtype."""
    if _is_quant(w) and fp4_path(x, w) == "kernel":
        from dsjax_kernels.moe_gmm import moe_gmm
        try:
            return moe_gmm(x, w.packed, w.scales, w.global_scale, group_sizes, fmt=w.fmt).astype(x.dtype)
        except ValueError:
            pass
    dense = materialize(w, x.dtype)
    y = jax.lax.ragged_dot_general(x, dense, group_sizes, _ragged_dims(), preferred_element_type=jnp.float32,
                                   precision=precision(x))
    return y.astype(x.dtype)


def expert_mlp(x_sorted: jax.Array, w_gate, w_up, w_down, group_sizes: jax.Array) -> jax.Array:
    """SwiGLU expert MLP over token rows sorted by expert: [A, D] -> [A, D] (spec §2.7)."""
    if fp4_path(x_sorted, w_gate, w_up, w_down) == "kernel" and w_gate.fmt == w_up.fmt == w_down.fmt:
        from dsjax_kernels.moe_gmm import expert_swiglu
        try:
            return expert_swiglu(x_sorted, w_gate, w_up, w_down, group_sizes, fmt=w_gate.fmt).astype(x_sorted.dtype)
        except ValueError:
            pass
    g = grouped_linear(x_sorted, w_gate, group_sizes)
    u = grouped_linear(x_sorted, w_up, group_sizes)
    return grouped_linear(jax.nn.silu(g) * u, w_down, group_sizes)

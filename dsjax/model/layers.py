"""Elementwise and small building blocks of the DeepSeek forward pass: RMSNorm, YaRN rope, SwiGLU, embedding.

Pure functions of arrays and a frozen ModelConfig. No placement, no I/O, no logging.
Math follows reference/deepseek-spec.md §2 (HF transformers semantics where HF and DeepSeek's code differ).
"""

# B batch, T tokens, D hidden, R rope dim, I intermediate, V vocab

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import ops
from dsjax.config import ModelConfig

LATENT_NORM_EPS = 1e-6  # q_a/kv_a norms use the class default, never config.rms_norm_eps (spec §2.2)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalize in float32, cast back to x.dtype, then scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


@functools.lru_cache(maxsize=32)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [R/2] with YaRN blending (spec §2.5), in float32 like the HF reference."""
    d = cfg.qk_rope_head_dim
    base = np.float32(cfg.rope_theta)
    exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    pos_freqs = base ** exponents
    inv_extra = np.float32(1.0) / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_extra.astype(np.float32)
    inv_inter = np.float32(1.0) / (np.float32(rs.factor) * pos_freqs)

    def corr_dim(n_rot: float) -> float:
        return (d * np.log(rs.original_max_position_embeddings / (n_rot * 2 * np.pi))) / (2 * np.log(cfg.rope_theta))

    low, high = corr_dim(rs.beta_fast), corr_dim(rs.beta_slow)
    if rs.truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrap = np.float32(1) - ramp.astype(np.float32)
    return (inv_inter * (1 - extrap) + inv_extra * extrap).astype(np.float32)


def rope_cos_sin(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin [..., R/2] for absolute positions, times HF's yarn attention factor (1.0 for official configs)."""
    theta = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    f = cfg.rope_attention_factor
    return jnp.cos(theta) * f, jnp.sin(theta) * f


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of checkpoint layout (spec §2.5).

    x: [B, T, ..., R]; cos/sin: [B, T, R/2]. The output is de-interleaved ([y0, y2, .., y1, y3, ..]), as HF's
    rope_interleave path produces: q·k is unchanged because q_pe and k_pe use the same layout, and the KV cache
    stores k_pe in this layout.
    """
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    x32 = x.astype(jnp.float32)
    x0, x1 = x32[..., 0::2], x32[..., 1::2]
    y = jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return y.astype(x.dtype)


def swiglu_mlp(x: jax.Array, gate, up, down) -> jax.Array:
    """down(silu(gate(x)) * up(x)) with [out, in] weights (spec §2.7)."""
    g = ops.linear(x, gate)
    u = ops.linear(x, up)
    return ops.linear(jax.nn.silu(g) * u, down)


def embed(tokens: jax.Array, table: jax.Array) -> jax.Array:
    """[B, T] ids -> [B, T, D]; no scaling (spec §2.1)."""
    return jnp.take(table, tokens, axis=0)

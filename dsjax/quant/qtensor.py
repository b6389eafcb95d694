"""`QTensor`, the FP4 weight container, and the functions that make, read and multiply it.

Owns the in-memory layout of an FP4 weight W [..., N, K] (N out-features, K in-features, as HF nn.Linear;
leading axes are e.g. stacked experts [E, N, K]):

    packed        uint8   [..., N, K/2]    two E2M1 codes per byte, element 2j in the low nibble (fp4.py)
    scales        uint8   [..., N, K/bs]   raw block-scale bits: E4M3 for 'nvfp4' (bs 16), E8M0 for 'mxfp4' (bs 32)
    global_scale  float32 [...]            one per matrix: NVFP4's weight_scale_2; ones for MXFP4
    fmt           static  'nvfp4' | 'mxfp4'

    W[..., n, k] = (val(code[..., n, k]) * scale(scales[..., n, k // bs])) * global_scale[...]

The product is evaluated in exactly this order in float32 everywhere (val * scale is exact), so the jnp and
numpy dequantizers agree bit for bit. Every leaf has the leading axes first, so `jax.tree.map(lambda a: a[e], q)`
selects one expert and `jax.tree.map(lambda *a: np.stack(a), *qs)` stacks matrices of one format.

Caveat: XLA on CPU flushes float32 subnormals to zero (inputs and results), numpy does not; the two
dequantizers agree bit for bit whenever scales and results are normal floats (always, for real weights).

Arithmetic of each format: nvfp4.py, mxfp4.py. This file does no I/O; the store decides where bytes live.
"""

# N out-features, K in-features, bs block size, ... leading axes (experts)

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsjax.quant.fp4 import E2M1_VALUES, e2m1_decode_jax, unpack_nibbles, unpack_nibbles_jax
from dsjax.quant.mxfp4 import MXFP4_BLOCK, e8m0_to_float_jax, e8m0_to_float_np, quantize_mxfp4
from dsjax.quant.nvfp4 import NVFP4_BLOCK, e4m3_to_float_jax, quantize_nvfp4

BLOCK_SIZES = {"nvfp4": NVFP4_BLOCK, "mxfp4": MXFP4_BLOCK}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class QTensor:
    """An FP4 weight [..., N, K]: packed codes, raw block-scale bits and a per-matrix FP32 scale.

    A pytree: the three arrays are leaves (numpy on the host, jax.Array on device) and `fmt` is static
    metadata, so a QTensor passes through `jax.jit`, `jax.device_put` and `jax.tree.map` unchanged.
    Build one with `quantize`, `from_modelopt_nvfp4` or `from_gpt_oss_mxfp4`.
    """

    packed: Any         # uint8 [..., N, K/2]
    scales: Any         # uint8 [..., N, K/bs]
    global_scale: Any   # float32 [...]
    fmt: str = dataclasses.field(metadata=dict(static=True))

    @property
    def block_size(self) -> int:
        return BLOCK_SIZES[self.fmt]

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape [..., N, K] of the weight."""
        return tuple(self.packed.shape[:-1]) + (2 * self.packed.shape[-1],)

    @property
    def ndim(self) -> int:
        return len(self.packed.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the three arrays (codes at 0.5 B/element, plus scales)."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in (self.packed, self.scales, self.global_scale))

    def __repr__(self) -> str:
        return f"QTensor(fmt={self.fmt!r}, shape={self.shape}, nbytes={self.nbytes})"


def _check_layout(q: QTensor) -> QTensor:
    """Validate shapes and dtypes of a host-side QTensor; returns it."""
    if q.fmt not in BLOCK_SIZES:
        raise ValueError(f"fmt must be one of {sorted(BLOCK_SIZES)}, got {q.fmt!r}")
    p, s, g = q.packed, q.scales, q.global_scale
    if p.dtype != np.uint8 or s.dtype != np.uint8 or g.dtype != np.float32:
        raise ValueError(f"QTensor dtypes must be uint8/uint8/float32, got {p.dtype}/{s.dtype}/{g.dtype}")
    if p.ndim < 2:
        raise ValueError(f"packed must be [..., N, K/2], got shape {p.shape}")
    n_blocks = 2 * p.shape[-1] // q.block_size
    if 2 * p.shape[-1] % q.block_size or s.shape != p.shape[:-1] + (n_blocks,):
        raise ValueError(f"{q.fmt}: scales shape {s.shape} does not match packed {p.shape} "
                         f"(expected {p.shape[:-1] + (n_blocks,)} for K={2 * p.shape[-1]}, block {q.block_size})")
    if g.shape != p.shape[:-2]:
        raise ValueError(f"global_scale shape {g.shape} must equal the leading axes {p.shape[:-2]}")
    return q


def quantize(w, fmt: str) -> QTensor:
    """Quantize a weight to NVFP4 or MXFP4 on the host (numpy).

    Args:
        w: float array [..., N, K] (float32, bfloat16, ...; numpy or jax), finite. K is the input axis.
        fmt: 'nvfp4' (16-element E4M3 blocks + per-matrix FP32 scale) or 'mxfp4' (32-element E8M0 blocks).

    Returns:
        A QTensor holding numpy arrays; NVFP4's global scale has one entry per matrix (shape [...]).

    Raises:
        ValueError: unknown fmt, fewer than 2 axes, K not a multiple of the block size, or non-finite values.

    Example:
        >>> q = quantize(np.random.randn(64, 128).astype(np.float32), "nvfp4")
        >>> q.shape, q.packed.shape, q.scales.shape
        ((64, 128), (64, 64), (64, 8))
    """
    if fmt not in BLOCK_SIZES:
        raise ValueError(f"fmt must be one of {sorted(BLOCK_SIZES)}, got {fmt!r}")
    w = np.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"quantize expects a weight [..., N, K], got shape {w.shape}")
    k, bs = w.shape[-1], BLOCK_SIZES[fmt]
    if k % bs:
        raise ValueError(f"{fmt}: K={k} (last axis of shape {w.shape}) is not a multiple of the block size {bs}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise ValueError(f"quantize: weight of shape {w.shape} holds inf or NaN")
    if fmt == "nvfp4":
        packed, scales, global_scale = quantize_nvfp4(w)
    else:
        packed, scales = quantize_mxfp4(w)
        global_scale = np.ones(w.shape[:-2], dtype=np.float32)
    return QTensor(packed=packed, scales=scales, global_scale=global_scale, fmt=fmt)


def _block_scales_jax(q: QTensor) -> jax.Array:
    return e4m3_to_float_jax(q.scales) if q.fmt == "nvfp4" else e8m0_to_float_jax(q.scales)


def dequantize(q: QTensor, dtype=jnp.bfloat16) -> jax.Array:
    """Dense weight [..., N, K] from a QTensor (pure jnp; jit-able; leading axes allowed).

    Computed in float32 as (val * block_scale) * global_scale, then cast once to `dtype`.

    Args:
        q: the quantized weight (numpy or jax leaves).
        dtype: output dtype.

    Returns:
        jax.Array [..., N, K] of `dtype`.

    Example:
        >>> w = jax.jit(dequantize)(quantize(np.ones((2, 32), np.float32), "mxfp4"))   # bf16 ones
    """
    bs = q.block_size
    vals = e2m1_decode_jax(unpack_nibbles_jax(q.packed))                   # [..., N, K] f32
    scales = _block_scales_jax(q)                                          # [..., N, K/bs]
    w = vals.reshape(scales.shape + (bs,)) * scales[..., None]             # [..., N, K/bs, bs]
    w = w * jnp.asarray(q.global_scale, jnp.float32)[..., None, None, None]
    return w.reshape(q.shape).astype(dtype)


def dequantize_np(q: QTensor) -> np.ndarray:
    """Dense float32 weight [..., N, K] in numpy: the oracle for `dequantize` and the kernels.

    Independent of the jnp path: the plain 16-entry value table, ml_dtypes for E4M3, ldexp for E8M0.
    """
    bs = q.block_size
    vals = E2M1_VALUES[unpack_nibbles(np.asarray(q.packed))]
    raw = np.asarray(q.scales, dtype=np.uint8)
    if q.fmt == "nvfp4":
        scales = raw.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        scales = e8m0_to_float_np(raw)
    w = vals.reshape(scales.shape + (bs,)) * scales[..., None]
    w = w * np.asarray(q.global_scale, np.float32)[..., None, None, None]
    return w.reshape(q.shape).astype(np.float32, copy=False)


def qlinear_reference(x: jax.Array, q: QTensor) -> jax.Array:
    """y = x @ W.T for an FP4 weight: dequantize to x.dtype, dot with float32 accumulation, cast to x.dtype.

    The pure-jnp reference that the fused FP4 kernels must match.

    Args:
        x: activations [..., K] for a weight [N, K]; for stacked weights [*L, N, K], x is [*L, T, K].
        q: the weight.

    Returns:
        [..., N] (or [*L, T, N]) in x.dtype.
    """
    w = dequantize(q, x.dtype)
    if q.ndim == 2:
        y = jnp.dot(x, w.T, preferred_element_type=jnp.float32)
    else:
        y = jnp.matmul(x, jnp.swapaxes(w, -1, -2), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def from_modelopt_nvfp4(weight_u8, weight_scale_e4m3, weight_scale_2) -> QTensor:
    """Wrap ModelOpt NVFP4 tensors bit for bit (no re-quantization; deepseek-spec.md §3.3).

    Args:
        weight_u8: `P.weight`, uint8 [..., N, K/2] (ModelOpt packs element 2j in the low nibble, as we do).
        weight_scale_e4m3: `P.weight_scale`, float8_e4m3fn (or its raw uint8 bits) [..., N, K/16].
        weight_scale_2: `P.weight_scale_2`, float32, scalar for one matrix (shape [] or [1]) or [...] for stacked.

    Returns:
        QTensor(fmt='nvfp4') whose arrays hold the same bytes.

    Raises:
        ValueError: on wrong dtypes, mismatched shapes, or NaN block scales.
    """
    packed = np.ascontiguousarray(weight_u8)
    if packed.dtype != np.uint8:
        raise ValueError(f"ModelOpt NVFP4 weight must be uint8, got {packed.dtype}")
    scales = np.ascontiguousarray(weight_scale_e4m3)
    if scales.dtype == ml_dtypes.float8_e4m3fn:
        scales = scales.view(np.uint8)
    elif scales.dtype != np.uint8:
        raise ValueError(f"ModelOpt NVFP4 weight_scale must be float8_e4m3fn (or its uint8 bits), got {scales.dtype}")
    if ((scales & 0x7F) == 0x7F).any():
        raise ValueError("ModelOpt NVFP4 weight_scale holds E4M3 NaN")
    g = np.asarray(weight_scale_2)
    if g.dtype != np.float32:
        raise ValueError(f"ModelOpt NVFP4 weight_scale_2 must be float32, got {g.dtype}")
    lead = packed.shape[:-2]
    if g.size != int(np.prod(lead)):
        raise ValueError(f"weight_scale_2 of shape {g.shape} does not match the leading axes {lead}")
    q = QTensor(packed=packed, scales=scales, global_scale=g.reshape(lead), fmt="nvfp4")
    return _check_layout(q)


def from_gpt_oss_mxfp4(blocks, scales) -> QTensor:
    """Wrap gpt-oss style MXFP4 tensors bit for bit (deepseek-spec.md §3.4).

    Args:
        blocks: `<name>_blocks`, uint8 [..., N, G, 16] (32 E2M1 codes per block, low nibble first).
        scales: `<name>_scales`, uint8 [..., N, G] (E8M0 bits).

    Returns:
        QTensor(fmt='mxfp4') of logical shape [..., N, 32 G].
    """
    blocks = np.ascontiguousarray(blocks)
    scales = np.ascontiguousarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"gpt-oss MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.ndim < 3 or blocks.shape[-1] != MXFP4_BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"gpt-oss MXFP4 expects blocks [..., N, G, 16] and scales [..., N, G], "
                         f"got {blocks.shape} and {scales.shape}")
    packed = blocks.reshape(blocks.shape[:-2] + (blocks.shape[-2] * blocks.shape[-1],))
    q = QTensor(packed=packed, scales=scales, global_scale=np.ones(scales.shape[:-2], np.float32), fmt="mxfp4")
    return _check_layout(q)

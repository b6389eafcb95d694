"""DeepSeek FP8 block format: float8_e4m3fn weights with one FP32 multiplier per 128x128 block.

Owns the arithmetic of the official DeepSeek-V3/R1/V3.1 and Kimi-K2 checkpoints (deepseek-spec.md §3.2;
DeepSeek `inference/kernel.py:weight_dequant_kernel`, README_WEIGHTS.md). Despite its name, `weight_scale_inv`
multiplies:

    W[r, c] = float(q[r, c]) * scale_inv[r // 128, c // 128]       scale_inv [ceil(N/128), ceil(K/128)]

Edge blocks of dims that are not multiples of 128 are partial (the scale grid is repeated and cropped, as
jax-llm-examples `_dequant_params` does). The converter reads these tensors and re-quantizes them to FP4, so
this file is numpy only and works one 128-row band at a time: no temporary larger than the output itself.
`quantize_fp8_block` exists so tests can build FP8 checkpoints from bf16 weights.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = 128
E4M3_MAX = 448.0


def _check(q: np.ndarray, scale_inv: np.ndarray, block: int) -> None:
    if q.ndim != 2:
        raise ValueError(f"FP8 block weights must be 2-D [N, K], got shape {q.shape}")
    expected = (-(-q.shape[0] // block), -(-q.shape[1] // block))
    if scale_inv.shape != expected:
        raise ValueError(f"scale_inv shape {scale_inv.shape} does not match weight {q.shape}: "
                         f"expected {expected} for {block}x{block} blocks")


def dequantize_fp8_block(q, scale_inv, *, block: int = FP8_BLOCK) -> np.ndarray:
    """Dequantize a DeepSeek FP8 block-scaled weight to float32.

    Args:
        q: float8_e4m3fn [N, K] (or its raw uint8 bits, as a safetensors `F8_E4M3` buffer may arrive).
        scale_inv: float32 [ceil(N/block), ceil(K/block)], the `weight_scale_inv` multipliers.
        block: block edge (config `weight_block_size`; 128 for every DeepSeek checkpoint).

    Returns:
        float32 [N, K], W[r, c] = q[r, c] * scale_inv[r // block, c // block] (one float32 rounding).

    Example:
        >>> w = dequantize_fp8_block(q, scale_inv)      # q [576, 7168] -> 5 x 56 scales
    """
    q = np.asarray(q)
    if q.dtype == np.uint8:
        q = q.view(ml_dtypes.float8_e4m3fn)
    if q.dtype != ml_dtypes.float8_e4m3fn:
        raise ValueError(f"FP8 block weights must be float8_e4m3fn, got {q.dtype}")
    scale_inv = np.asarray(scale_inv, dtype=np.float32)
    _check(q, scale_inv, block)
    n, k = q.shape
    out = np.empty((n, k), dtype=np.float32)
    for i, r0 in enumerate(range(0, n, block)):
        band = out[r0:r0 + block]                                     # [<=block, K] view
        band[...] = q[r0:r0 + block]                                  # exact e4m3 -> f32
        band *= np.repeat(scale_inv[i], block)[:k]                    # [K] scale row, repeated and cropped
    return out


def quantize_fp8_block(w, *, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a weight to DeepSeek's FP8 block format (for building test checkpoints).

    Per block: scale = amax / 448, q = e4m3(W / scale) (round-to-nearest-even, clipped to ±448),
    scale_inv = scale. An all-zero block gets scale 1.0 and zero codes.

    Args:
        w: finite float array [N, K] (float32 or bfloat16).
        block: block edge.

    Returns:
        (q float8_e4m3fn [N, K], scale_inv float32 [ceil(N/block), ceil(K/block)]).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"FP8 block weights must be 2-D [N, K], got shape {w.shape}")
    n, k = w.shape
    col_starts = np.arange(0, k, block)
    q = np.empty((n, k), dtype=ml_dtypes.float8_e4m3fn)
    scale_inv = np.empty((-(-n // block), len(col_starts)), dtype=np.float32)
    for i, r0 in enumerate(range(0, n, block)):
        band = np.abs(w[r0:r0 + block].astype(np.float32))          # [<=block, K]
        if not np.isfinite(band).all():
            raise ValueError(f"quantize_fp8_block: rows {r0}..{r0 + band.shape[0] - 1} hold inf or NaN")
        amax = np.maximum.reduceat(band.max(axis=0), col_starts)    # [ceil(K/block)]
        scale = np.maximum(amax / np.float32(E4M3_MAX), np.finfo(np.float32).tiny)   # no 0 divisor
        scale = np.where(amax > 0, scale, np.float32(1.0)).astype(np.float32)
        scale_inv[i] = scale
        scaled = w[r0:r0 + block].astype(np.float32) / np.repeat(scale, block)[:k]
        q[r0:r0 + block] = np.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, scale_inv

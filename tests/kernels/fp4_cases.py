"""Shared helpers for the FP4 kernel tests: fresh random FP4 weights, an f64 oracle, output poisoning, and
the comparison whose failure message prints max-abs and relative error."""

import jax.numpy as jnp
import numpy as np

from tolerances import rel_l2

BLOCK = {"nvfp4": 16, "mxfp4": 32}

# The one table of tolerances for the kernel tests (relative L2 unless named *_maxabs: max-abs / max |expected|).
#   kernel_vs_reference: bf16 operands both sides; the reference rounds (val*scale*global) to bf16 while the
#     kernel keeps val*scale exact in bf16 and applies the global scale in float32 (measured ~1e-3).
#   kernel_vs_oracle: kernel against a float64 product of the exact dequantized weight (bf16 output rounding).
#   swiglu: two chained products with a bf16 intermediate; the reference also rounds gate/up to bf16.
KERNEL_TOL = {
    "kernel_vs_reference": 1e-2,
    "kernel_vs_reference_maxabs": 3e-2,
    "kernel_vs_oracle": 1e-2,
    "swiglu_vs_reference": 2e-2,
    "reference_vs_oracle_f32": 1e-5,
}


def fresh_rng() -> tuple[np.random.Generator, int]:
    """A generator on a new seed every run (printed in failure messages so a failure can be replayed)."""
    seed = int(np.random.SeedSequence().entropy % (2**31))
    return np.random.default_rng(seed), seed


def random_fp4(rng, shape, fmt: str):
    """Random (packed, scales, global_scale) of logical shape [..., N, K]: every byte value is a valid pair of
    codes; scale bits drawn from a realistic range (E4M3 2^-6..2^2, E8M0 2^-8..2^2; never NaN)."""
    *lead, n, k = shape
    packed = rng.integers(0, 256, size=(*lead, n, k // 2), dtype=np.uint8)
    if fmt == "nvfp4":
        scales = rng.integers(0x08, 0x48, size=(*lead, n, k // 16), dtype=np.uint8)
        gs = rng.uniform(0.5, 2.0, size=tuple(lead)).astype(np.float32)
    else:
        scales = rng.integers(119, 130, size=(*lead, n, k // 32), dtype=np.uint8)
        gs = np.ones(tuple(lead), np.float32)
    return packed, scales, gs


def dequant_oracle(packed, scales, gs, fmt: str) -> np.ndarray:
    """float64 W [..., N, K] via dsjax's numpy dequantizer (plain value table, ml_dtypes E4M3, ldexp E8M0)."""
    from dsjax.quant import QTensor, dequantize_np
    q = QTensor(packed=np.asarray(packed), scales=np.asarray(scales), global_scale=np.asarray(gs, np.float32),
                fmt=fmt)
    return dequantize_np(q).astype(np.float64)


def poison_device_memory(nbytes: int = 1 << 28) -> None:
    """Fill a large device buffer with NaN and free it, so the allocator hands the NaN-filled memory to the next
    outputs: a tile the kernel never writes then shows up as NaN (assert_kernel_close rejects non-finite)."""
    buf = jnp.full((nbytes // 2,), jnp.nan, jnp.bfloat16)
    buf.block_until_ready()
    del buf


def assert_kernel_close(actual, expected, kind: str, what: str) -> float:
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    bad = ~np.isfinite(a)
    assert not bad.any(), f"{what}: {bad.sum()} non-finite values (unwritten tiles?) at rows {np.unique(np.nonzero(bad)[0])[:10]}"
    err = rel_l2(a, e)
    d = np.abs(a - e)
    scale = max(np.abs(e).max(), 1e-30)
    msg = f"{what}: relative L2 error {err:.3e} (bar {KERNEL_TOL[kind]:.1e}, {kind}); max-abs {d.max():.3e} ({d.max() / scale:.3e} of max|expected|)"
    assert err <= KERNEL_TOL[kind], msg
    if kind + "_maxabs" in KERNEL_TOL:
        assert d.max() / scale <= KERNEL_TOL[kind + "_maxabs"], msg
    return err

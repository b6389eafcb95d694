"""The tiered runtime's expert-rows call (LayerPrograms._moe_rows) on both of its paths: the kernels reading the
GPU slot pool in place (here the Pallas interpreter, standing in for the GPU) and the references on the gathered
slots of the chunk, against a float64 SwiGLU oracle per assignment; assignments outside the chunk keep their rows."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import dsjax_kernels.moe_gmm as moe_gmm_pkg
from dsjax import ops
from dsjax.quant import QTensor
from dsjax.runtime.programs import LayerPrograms
from fp4_cases import assert_kernel_close, dequant_oracle, fresh_rng, random_fp4


def _oracle(x, gate, up, down):
    g, u = x @ gate.T, x @ up.T
    return (g / (1 + np.exp(-g)) * u) @ down.T


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_moe_rows_reads_slots_in_place_or_gathered(monkeypatch, path, fmt):
    rng, seed = fresh_rng()
    P, D, inter, B, K = 6, 128, 32, 5, 3
    parts = {"gate": random_fp4(rng, (P, inter, D), fmt), "up": random_fp4(rng, (P, inter, D), fmt),
             "down": random_fp4(rng, (P, D, inter), fmt)}
    pool = {k: QTensor(packed=jnp.asarray(p), scales=jnp.asarray(s), global_scale=jnp.asarray(g), fmt=fmt)
            for k, (p, s, g) in parts.items()}
    dense = {k: dequant_oracle(*v, fmt) for k, v in parts.items()}
    hn = jnp.asarray(rng.standard_normal((B, 1, D)) * 0.5, jnp.bfloat16)
    slot_idx = rng.integers(0, P, size=(B, K)).astype(np.int32)
    slot_idx[rng.random((B, K)) < 0.4] = P                  # assignments of other chunks
    slot_idx[0] = P                                         # a token with nothing in this chunk
    acc = jnp.asarray(rng.standard_normal((B, K, D)), jnp.bfloat16)
    if path == "kernel":                                    # the GPU path, run by the Pallas interpreter
        monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(moe_gmm_pkg, "expert_swiglu",
                            functools.partial(moe_gmm_pkg.expert_swiglu, interpret=True))
        calls = []
        monkeypatch.setattr(ops, "fp4_path", lambda *a: calls.append(1) or "kernel")
    with ops.fusion(path == "kernel"):
        out = np.asarray(jnp.asarray(LayerPrograms._moe_rows(pool, jnp.asarray(slot_idx), hn, acc), jnp.float32))
    if path == "kernel":
        assert calls, "the kernel path was not taken"
    x = np.asarray(jnp.asarray(hn, jnp.float32), np.float64).reshape(B, D)
    inside = slot_idx < P
    np.testing.assert_array_equal(out[~inside], np.asarray(jnp.asarray(acc, jnp.float32))[~inside],
                                  err_msg="rows of other chunks must keep acc")
    expect = np.stack([_oracle(x[t], *(dense[p][slot_idx[t, k]] for p in ("gate", "up", "down")))
                       for t, k in zip(*np.nonzero(inside))])
    assert_kernel_close(out[inside], expect, "swiglu_vs_reference", f"{path} {fmt} seed {seed}")

"""The CPU expert kernel (dsjax.runtime.cpu_experts) against dsjax's own expert_rows on the same FP4 experts (the
QTensor reference path: dequantize, then a float32 grouped dot): NVFP4 and MXFP4, hidden and intermediate sizes that
are multiples of the block but not powers of two, 1-8 rows, top-k 2-8, experts shared between rows and repeated in a
row, empty assignments (-1), float32 and bfloat16 activations, buffers given as numpy arrays or host jax.Arrays."""

import concurrent.futures
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsjax.model.moe import expert_rows
from dsjax.quant import QTensor, quantize
from dsjax.runtime import cpu_experts
from dsjax.runtime.cpu_experts import cpu_expert_rows
from dsjax.runtime.expert_layout import ALIGN, ExpertLayout, Part, flatten
from tolerances import assert_close

SHAPES = {"nvfp4": (208, 80), "mxfp4": (224, 96)}     # (D, I): 13x16 / 5x16 and 7x32 / 3x32
U = 6                                                  # distinct experts


def _layout(q: dict[str, QTensor]) -> ExpertLayout:
    """The layout ExpertLayout.of_store builds for experts of these shapes (parts in store order, ALIGN-padded)."""
    parts, offset = [], 0
    for proj in ("gate", "up", "down"):
        for field in ("packed", "scales", "global_scale"):
            a = getattr(q[proj], field)
            parts.append(Part(proj, field, offset, tuple(a.shape[1:]), a.dtype.name))
            offset += -(-parts[-1].nbytes // ALIGN) * ALIGN
    return ExpertLayout(tuple(parts), tuple((proj, q[proj].fmt) for proj in ("gate", "up", "down")), offset)


@pytest.fixture(scope="module", params=["nvfp4", "mxfp4"])
def experts(request):
    """U random experts of one format: (fmt, stacked QTensors {proj: [U, ...]}, layout, buffers uint8 [U, nbytes])."""
    fmt = request.param
    d, i = SHAPES[fmt]
    rng = np.random.default_rng(7)
    w = {"gate": rng.standard_normal((U, i, d)) / math.sqrt(d), "up": rng.standard_normal((U, i, d)) / math.sqrt(d),
         "down": rng.standard_normal((U, d, i)) / math.sqrt(i)}
    q = {proj: quantize(a.astype(np.float32), fmt) for proj, a in w.items()}
    layout = _layout(q)
    rows = flatten({proj: {f: getattr(t, f) for f in ("packed", "scales", "global_scale")} for proj, t in q.items()},
                   layout)
    return fmt, q, layout, rows


def _reference(x, assign, q) -> np.ndarray:
    """expert_rows on the stacked QTensors (assignments of -1 computed with expert 0, then zeroed)."""
    idx = np.where(assign < 0, 0, assign).astype(np.int32)
    qj = {p: jax.tree.map(jnp.asarray, t) for p, t in q.items()}
    y = np.array(expert_rows(jnp.asarray(x), jnp.asarray(idx), qj["gate"], qj["up"], qj["down"]), np.float32)
    y[assign < 0] = 0
    return y


def _assignments(t, k, seed) -> np.ndarray:
    """[t, k] experts drawn from U with repeats across rows; row 0 repeats an expert, the last row has a -1."""
    a = np.random.default_rng(seed).integers(0, U, (t, k)).astype(np.int32)
    a[0, 1] = a[0, 0]
    if t > 1:
        a[-1, -1] = -1
    return a


@pytest.mark.parametrize("t,k", [(1, 2), (1, 8), (3, 4), (8, 8)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_expert_rows(experts, t, k, dtype):
    fmt, q, layout, rows = experts
    d, _ = SHAPES[fmt]
    x = np.random.default_rng(t * 10 + k).standard_normal((t, d)).astype(np.float32)
    if dtype == "bfloat16":
        x = x.astype(ml_dtypes.bfloat16)
    assign = _assignments(t, k, seed=t + k)
    got = cpu_expert_rows(x, list(rows), assign, layout)
    assert got.dtype == np.float32 and got.shape == (t, k, d)
    assert np.all(got[assign < 0] == 0)
    # The same activations in float32: only the summation order differs.
    assert_close(got, _reference(x.astype(np.float32), assign, q), "cpu_experts_f32", f"{fmt} {dtype} T={t} K={k}")
    if dtype == "bfloat16":
        # The GPU path's numbers: bf16 activations and bf16 gate/up/h/y in between.
        assert_close(got, _reference(x, assign, q), "cpu_experts_vs_bf16", f"{fmt} bf16 path T={t} K={k}")


def test_buffer_subset_and_order(experts):
    """Buffers are whatever experts the caller passes, in its order; the result does not depend on the thread count
    (every output element is summed by one thread in one order), and raw bfloat16 bits give the bfloat16 result."""
    fmt, q, layout, rows = experts
    d, _ = SHAPES[fmt]
    picked = [4, 1, 3]                                          # buffers 0, 1, 2 hold experts 4, 1, 3
    x = np.random.default_rng(0).standard_normal((3, d)).astype(ml_dtypes.bfloat16)
    local = np.array([[0, 2], [1, -1], [2, 2]], np.int32)
    got1 = cpu_expert_rows(x, [rows[e] for e in picked], local, layout, threads=1)
    got2 = cpu_expert_rows(x.view(np.uint16), [rows[e] for e in picked], local, layout, threads=2)
    np.testing.assert_array_equal(got1, got2)
    want = _reference(x.astype(np.float32), np.where(local < 0, -1, np.array(picked)[local]), q)
    assert_close(got1, want, "cpu_experts_f32", f"{fmt} subset")



def test_calls_from_several_threads_equal_the_sequential_ones(experts):
    """Four Python threads calling the kernel at once (as engines of one process may) get what one caller gets."""
    fmt, q, layout, rows = experts
    d, _ = SHAPES[fmt]
    xs = [np.random.default_rng(50 + i).standard_normal((4, d)).astype(np.float32) for i in range(4)]
    assign = [_assignments(4, 4, seed=60 + i) for i in range(4)]
    want = [cpu_expert_rows(x, list(rows), a, layout, threads=2) for x, a in zip(xs, assign)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: [cpu_expert_rows(xs[i], list(rows), assign[i], layout, threads=2)
                                       for _ in range(5)], range(4)))
    for i in range(4):
        for g in got[i]:
            np.testing.assert_array_equal(g, want[i])


def test_concurrent_calls_under_numbas_workqueue_layer():
    """numba's fallback threading layer aborts the process when two threads enter a parallel region at once; the
    module's lock keeps concurrent callers apart (a child process forced onto that layer)."""
    code = """
import concurrent.futures, numpy as np
from dsjax.runtime import cpu_experts
layout = cpu_experts._tiny_layout()
rng = np.random.default_rng(0)
bufs = [rng.integers(0, 120, layout.nbytes, dtype=np.uint8) for _ in range(3)]   # codes and scales < 0x78: finite
assign = np.array([[0, 1], [2, 0]], np.int32)
xs = [rng.standard_normal((2, 64)).astype(np.float32) for _ in range(4)]
want = [cpu_experts.cpu_expert_rows(x, bufs, assign, layout, threads=2) for x in xs]
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(lambda i: [cpu_experts.cpu_expert_rows(xs[i], bufs, assign, layout, threads=2)
                                   for _ in range(20)], range(4)))
assert all(np.array_equal(g, want[i]) for i in range(4) for g in got[i])
assert cpu_experts.threading_layer() == "workqueue", cpu_experts.threading_layer()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "NUMBA_THREADING_LAYER": "workqueue"})
    assert r.returncode == 0, r.stderr[-3000:]

def test_jax_host_buffers(experts):
    """Host-memory jax.Arrays (here on the CPU device) are read in place like numpy buffers."""
    fmt, q, layout, rows = experts
    d, _ = SHAPES[fmt]
    x = np.random.default_rng(1).standard_normal((2, d)).astype(np.float32)
    assign = np.array([[0, 1], [1, 2]], np.int32)
    want = cpu_expert_rows(x, list(rows[:3]), assign, layout)
    got = cpu_expert_rows(jnp.asarray(x), [jax.device_put(r, jax.devices("cpu")[0]) for r in rows[:3]], assign, layout)
    np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
def test_pinned_host_buffers(experts):
    """The host cache's buffers (pinned_host jax.Arrays of the GPU) are read in place, bit for bit as numpy's."""
    fmt, q, layout, rows = experts
    d, _ = SHAPES[fmt]
    dev = jax.devices("gpu")[0]
    pinned = [jax.device_put(r, jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")) for r in rows[:3]]
    x = np.random.default_rng(2).standard_normal((2, d)).astype(np.float32)
    assign = np.array([[0, 1], [2, 1]], np.int32)
    np.testing.assert_array_equal(cpu_expert_rows(x, pinned, assign, layout),
                                  cpu_expert_rows(x, list(rows[:3]), assign, layout))
    on_gpu = jax.device_put(rows[0], dev)
    with pytest.raises(ValueError, match="cannot read"):
        cpu_expert_rows(x, [on_gpu], assign[:, :1] * 0, layout)


def test_rejects_bad_input(experts):
    fmt, q, layout, rows = experts
    d, _ = SHAPES[fmt]
    x = np.zeros((1, d), np.float32)
    with pytest.raises(ValueError, match="outside"):
        cpu_expert_rows(x, [rows[0]], np.array([[1]], np.int32), layout)
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        cpu_expert_rows(x, [rows[0][:-1]], np.array([[0]], np.int32), layout)
    with pytest.raises(ValueError, match=r"x must be \[T"):
        cpu_expert_rows(np.zeros((1, d + 2), np.float32), [rows[0]], np.array([[0]], np.int32), layout)
    plain = ExpertLayout(layout.parts, (("gate", fmt), ("up", fmt), ("down", None)), layout.nbytes)
    assert cpu_experts.supports(layout) and not cpu_experts.supports(plain)
    assert cpu_experts.expert_bytes(layout) == sum(
        getattr(q[p], f)[0].nbytes for p in ("gate", "up", "down") for f in ("packed", "scales"))


def test_numba_imported_on_first_use():
    """`import dsjax` (and of this module) leaves numba alone; warm_up brings it in and compiles."""
    code = ("import sys, dsjax, dsjax.runtime.cpu_experts as c; assert 'numba' not in sys.modules; "
            "c.warm_up(); assert 'numba' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})

"""Routed experts computed on the host CPU, reading the host cache's flat expert buffers in place (issue 24).

At batch 1 an expert that misses the GPU costs its bytes over PCIe; the host reads its own RAM faster than that, so
computing some host-resident experts where their bytes are, beside the GPU copying the others, moves more expert bytes
per second than either path alone. This module owns the CPU computation of a few rows (batch <= ~8): for each
(row, expert) assignment, gate = x W_g^T, up = x W_u^T, h = silu(gate) * up, y = h W_d^T, float32 accumulation,
decoding NVFP4 / MXFP4 codes and block scales from the packed bytes in registers as it streams them (no dequantised
copy of any weight, not even of a row; the scratch is h, [assignments, I] float32). It returns the rows per
assignment, exactly what dsjax.model.moe.expert_rows returns, so the caller sums them with the routing weights
(moe.combine) next to the GPU experts' rows. Threads split the weight rows of the called experts evenly (gate/up,
then down); they are numba's (a parallel loop in one compiled call: its threading layer starts them without the GIL,
and the calling thread is one of them), so a call never waits for another Python thread to give up the GIL. Calls
are serialised by a lock of this module (numba's fallback threading layer, workqueue, must not be entered from two
threads at once).

It does not decide which experts run here (that is the policy's, from the rates bench/cpu_experts_bench.py measures),
move anything, or touch the GPU. The numba kernel lives in _cpu_experts_kernel.py and is imported on the first call
(`warm_up` compiles it ahead of time: ~3 s, or ~0.5 s from numba's cache), so `import dsjax` does not pay for numba.

Example:
    >>> layout = ExpertLayout.of_store(store, layer=3)
    >>> y = cpu_expert_rows(x, [buf_a, buf_b], np.array([[0, 1]], np.int32), layout, threads=16)   # [1, 2, D]
    >>> out = np.einsum("tkd,tk->td", y, routing_weight)
"""

# T rows of x, K assignments per row, U experts (buffers), D hidden, I moe intermediate

from __future__ import annotations

import functools
import os
import threading

import numpy as np

from dsjax.runtime.expert_layout import ALIGN, ExpertLayout, Part

FORMATS = {"nvfp4": 0, "mxfp4": 1}     # format -> its row in the kernel's scale tables
_BLOCKS = {"nvfp4": 16, "mxfp4": 32}
_MIN_ROWS_PER_THREAD = 64              # weight rows (~200 KB at V3's gate/up) below which a thread costs more than it adds


def cpu_expert_rows(x, buffers, assign, layout: ExpertLayout, threads: int | None = None) -> np.ndarray:
    """Expert_{assign[t, k]}(x[t]) for every assignment, computed on the CPU: [T, D] -> float32 [T, K, D].

    Args:
        x: activations [T, D]: float32, bfloat16 (ml_dtypes) or raw bfloat16 bits as uint16; numpy or jax.
        buffers: one flat expert buffer per distinct expert, as the host cache holds them: uint8 [layout.nbytes],
            a C-contiguous numpy array or a single-device jax.Array in host memory (pinned_host / unpinned_host, or
            on a CPU device). They are read in place through their addresses: the caller keeps them alive and
            unchanged until this returns.
        assign: int [T, K]: the index into `buffers` of the expert of each assignment, or -1 for none (its row of the
            result is zero).
        layout: where the parts of an expert sit in its buffer; gate, up and down must be NVFP4 or MXFP4.
        threads: CPU threads to use (all of this process's CPUs when None); the calling thread is one of them. The
            GIL is released while the kernel runs, so other Python threads (the engine's) go on meanwhile.

    Returns:
        float32 [T, K, D], the un-weighted rows of dsjax.model.moe.expert_rows.

    Raises:
        ValueError: a projection that is not FP4, inconsistent shapes, an assignment out of range, or a buffer of the
            wrong size or type.
    """
    meta = layout_meta(layout)
    x32 = _as_float32(x)
    assign = np.ascontiguousarray(assign, dtype=np.int64)
    d_hidden, n_inter = int(meta[0, 4]), int(meta[0, 3])
    if x32.ndim != 2 or x32.shape[1] != d_hidden:
        raise ValueError(f"x must be [T, {d_hidden}] for this layout, got shape {x32.shape}")
    if assign.ndim != 2 or assign.shape[0] != x32.shape[0]:
        raise ValueError(f"assign must be [T={x32.shape[0]}, K], got shape {assign.shape}")
    if assign.size and (assign.min() < -1 or assign.max() >= len(buffers)):
        raise ValueError(f"assign holds {assign.min()}..{assign.max()}, outside -1..{len(buffers) - 1} "
                         f"({len(buffers)} buffers)")
    threads = _check_threads(threads)
    addresses = np.array([_address(b, layout.nbytes) for b in buffers], dtype=np.int64)
    xe, xo = np.ascontiguousarray(x32[:, 0::2]), np.ascontiguousarray(x32[:, 1::2])
    # Assignments grouped by expert (stable: top-k order within an expert): order[start[u]:start[u + 1]].
    flat = assign.reshape(-1)
    order = np.argsort(flat, kind="stable")[np.count_nonzero(flat < 0):]
    start = np.zeros(len(buffers) + 1, np.int64)
    np.cumsum(np.bincount(flat[order], minlength=len(buffers)), out=start[1:])
    active = np.flatnonzero(np.diff(start))                  # experts with at least one assignment
    meta = np.concatenate([meta, [[assign.shape[1], 0, 0, 0, 0, 0, 0]]])     # row 3: top-k, for (t, k) = divmod
    he, ho = (np.empty((len(order), n_inter // 2), np.float32) for _ in range(2))
    y = np.zeros(assign.shape + (d_hidden,), np.float32)
    k = _kernel()
    with _LOCK:
        k.numba.set_num_threads(min(threads, k.numba.config.NUMBA_NUM_THREADS))
        k.expert_rows(_ranges(len(active) * n_inter, threads), _ranges(len(active) * d_hidden, threads),
                      xe, xo, addresses, layout.nbytes, active, start, order, meta, k.SCALE_TABLES, he, ho, y)
    return y


def supports(layout: ExpertLayout) -> bool:
    """Whether cpu_expert_rows can compute experts of this layout (gate, up and down all NVFP4 or MXFP4)."""
    try:
        layout_meta(layout)
    except ValueError:
        return False
    return True


def expert_bytes(layout: ExpertLayout) -> int:
    """Bytes of packed codes and scales the kernel reads per expert (the measure of its GB/s)."""
    return sum(p.nbytes for p in layout.parts if p.field in ("packed", "scales"))


def warm_up() -> None:
    """Import numba and compile the kernel (or load it from numba's cache) now rather than in the first call: one
    call on a tiny zero expert compiles every format's code."""
    layout = _tiny_layout()
    cpu_expert_rows(np.zeros((1, 64), np.float32), [np.zeros(layout.nbytes, np.uint8)], np.zeros((1, 1), np.int32),
                    layout, threads=1)


def threading_layer() -> str:
    """numba's threading layer the kernel's threads come from ('omp', 'tbb' or 'workqueue'), after the first call
    (warm_up): numba picks the first it can load then (NUMBA_THREADING_LAYER chooses)."""
    return _kernel().numba.threading_layer()


def default_threads() -> int:
    """The CPUs this process may run on (the default thread count)."""
    return len(os.sched_getaffinity(0))


_LOCK = threading.Lock()


def _check_threads(threads: int | None) -> int:
    cpus = default_threads()
    threads = cpus if threads is None else threads
    if not 1 <= threads <= cpus:
        raise ValueError(f"threads must lie in 1..{cpus} (the CPUs of this process), got {threads}")
    return threads


def _ranges(total: int, threads: int) -> int:
    """How many equal ranges (threads) to split `total` weight rows into: small work wakes fewer threads.

    numba's parallel loop rather than a pool of Python threads (until session 24): each pool worker took the GIL to
    start and to end its range, twice a call. Same run on a 2-core machine, medians: a tiny call on 2 threads 0.300
    -> 0.083 ms; one V3 expert at one row 2.64 -> 2.48 ms; 4 experts 7.49 -> 7.40 ms (bytes dominate)."""
    return max(1, min(threads, total // _MIN_ROWS_PER_THREAD))


@functools.lru_cache(maxsize=None)
def layout_meta(layout: ExpertLayout) -> np.ndarray:
    """int64 [3, 7]: for gate, up, down the packed, scale and global-scale offsets in the buffer, N, K, the format's
    row of the kernel's scale tables and the bytes per scale block; checked against the layout's shapes."""
    fmts = dict(layout.fmts)
    parts = {(p.proj, p.field): p for p in layout.parts}
    meta = np.zeros((3, 7), np.int64)
    for i, proj in enumerate(("gate", "up", "down")):
        fmt = fmts.get(proj)
        if fmt not in FORMATS:
            raise ValueError(f"the CPU expert kernel computes NVFP4 and MXFP4 experts; {proj} is {fmt or 'plain'}")
        try:
            packed, scales, gs = (parts[proj, f] for f in ("packed", "scales", "global_scale"))
        except KeyError as e:
            raise ValueError(f"layout has no {e.args[0]} part") from None
        n, k = packed.shape[0], 2 * packed.shape[1]
        bs = _BLOCKS[fmt]
        if (packed.dtype, scales.dtype, gs.dtype) != ("uint8", "uint8", "float32") or len(packed.shape) != 2 \
                or scales.shape != (n, k // bs) or k % bs or gs.shape != ():
            raise ValueError(f"{proj}: parts {packed.dtype}{list(packed.shape)}, {scales.dtype}{list(scales.shape)}, "
                             f"{gs.dtype}{list(gs.shape)} are not a {fmt} matrix of one expert")
        meta[i] = (packed.offset, scales.offset, gs.offset, n, k, FORMATS[fmt], bs // 2)
    (n_g, d_g), (n_u, d_u), (n_d, k_d) = meta[:, 3:5]
    if not (n_g == n_u == k_d and d_g == d_u == n_d):
        raise ValueError(f"expert shapes do not chain: gate [{n_g}, {d_g}], up [{n_u}, {d_u}], down [{n_d}, {k_d}]")
    meta.setflags(write=False)
    return meta


def _as_float32(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint16:                           # raw bfloat16 bits: the high half of a float32
        return (x.astype(np.uint32) << 16).view(np.float32)
    if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
        raise ValueError(f"x must hold floats (float32, bfloat16) or bfloat16 bits (uint16), got {x.dtype}")
    return np.asarray(x, dtype=np.float32)


def _address(buf, nbytes: int) -> int:
    """The address of an expert buffer's first byte, after checking that it holds `nbytes` contiguous bytes."""
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1 or buf.size != nbytes or not buf.flags.c_contiguous:
            raise ValueError(f"expert buffer must be C-contiguous uint8 [{nbytes}], got {buf.dtype}{list(buf.shape)}")
        return buf.ctypes.data
    if hasattr(buf, "unsafe_buffer_pointer"):          # a jax.Array: only host memory can be read in place
        if buf.dtype != np.uint8 or buf.shape != (nbytes,):
            raise ValueError(f"expert buffer must be uint8 [{nbytes}], got {buf.dtype}{list(buf.shape)}")
        (device,) = buf.devices()
        kind = buf.sharding.memory_kind
        if device.platform != "cpu" and kind not in ("pinned_host", "unpinned_host"):
            raise ValueError(f"expert buffer lives in {device} memory {kind!r}, which the CPU cannot read")
        buf.block_until_ready()
        return buf.unsafe_buffer_pointer()
    raise ValueError(f"expert buffer must be a numpy array or a jax.Array in host memory, got {type(buf).__name__}")


@functools.cache
def _tiny_layout() -> ExpertLayout:
    """An NVFP4 expert of hidden 64, intermediate 64 (for warm_up)."""
    parts, offset = [], 0
    for proj in ("gate", "up", "down"):
        for field, shape, dtype in (("packed", (64, 32), "uint8"), ("scales", (64, 4), "uint8"),
                                    ("global_scale", (), "float32")):
            parts.append(Part(proj, field, offset, shape, dtype))
            offset += -(-parts[-1].nbytes // ALIGN) * ALIGN
    return ExpertLayout(tuple(parts), tuple((proj, "nvfp4") for proj in ("gate", "up", "down")), offset)


@functools.cache
def _kernel():
    from dsjax.runtime import _cpu_experts_kernel
    return _cpu_experts_kernel

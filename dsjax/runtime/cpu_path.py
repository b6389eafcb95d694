"""CpuExpertPath: the CPU as one more mover of the tiered engine (issue 24). At a decode-sized step, some routed experts
that miss the GPU but sit in the pinned host cache are computed where their bytes are while the GPU copies and
computes the others; their rows then cross to the GPU and take the places of those assignments before the combine,
so the result is the same code in the same top-k order.

Threads: the kernel runs on the engine thread itself (and numba's threads beside it), after the engine thread has
issued the layer's GPU work (copies and the expert call return at once; the device runs them meanwhile). A worker
thread of its own, started before the GPU work, lost ~5 ms a call waiting for the GIL while the engine thread ran
Python (the interpreter's 5 ms switch interval; H100 run of 2026-12-06: 4.7 GB/s in the engine against 34.6 GB/s
alone; the last line of `bench/cpu_experts_bench.py` measures both orders).

Owns the kernel's measured rates (prefetch.CpuRates, which the policy's split_cpu reads) and the path's counters. It
does not decide which experts run here (prefetch.split_cpu does), look into the caches or hold a device array: the
engine hands it host buffers and takes back numpy rows.

Example:
    >>> path = CpuExpertPath(layout, n_layers=61, threads=16)
    >>> experts = path.choose(host_missing, ids, valid, link_bps=46.7e9, copied_anyway=0)
    >>> job = path.start(x, [host_cache.get((3, e)) for e in experts], experts, ids, valid)
    >>> # ... issue the layer's GPU copies and expert call ...
    >>> y, mask = path.finish(3, job)          # runs the kernel here: [N, K, D] float32, [N, K] bool
"""

# N rows of a step, K top-k, D hidden

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.runtime import cpu_experts
from dsjax.runtime.expert_layout import ExpertLayout
from dsjax.runtime.prefetch import CPU_PRIOR_BPS, CpuRates, split_cpu


def availability(mode: str, layout: ExpertLayout | None, platform: str) -> tuple[bool, str]:
    """compute_config.cpu_experts before the planner's say: (whether the path may run, why). `layout`: the host
    cache's expert layout (None when every expert sits on the GPU); `platform`: the engine device's. 'auto' needs a
    GPU backend: on a CPU backend the 'GPU' path already runs on these cores."""
    if mode == "off":
        return False, "off"
    if layout is None:
        return False, "every expert sits on the GPU"
    if not cpu_experts.supports(layout):
        return False, "the experts are not NVFP4 / MXFP4"
    if importlib.util.find_spec("numba") is None:
        return False, "numba is not installed"
    if mode == "auto" and platform == "cpu":
        return False, "a CPU backend"
    return True, mode


@dataclasses.dataclass(frozen=True)
class CpuJob:
    experts: frozenset                    # the layer's experts the CPU computes
    assign: np.ndarray                    # [N, K] index into the job's buffers, -1 where the GPU (or nobody) computes
    rows: int                             # real rows of the step (the rates' key)
    x: np.ndarray                         # [N, D] the layer's input rows
    buffers: tuple                        # the experts' pinned buffers, held by the job until the kernel returns


class CpuExpertPath:
    def __init__(self, layout: ExpertLayout, n_layers: int, threads: int = 0, prior_bps: float = CPU_PRIOR_BPS):
        """threads 0: every CPU of the process but one, at least 1 (the engine thread is one of the kernel's threads;
        the CPU left over runs the GPU runtime's own threads, which issue the copies and kernels the engine thread
        dispatched just before: with every core in the kernel they wait for a time slice)."""
        cpus = cpu_experts.default_threads()
        self.layout = layout
        self.expert_bytes = cpu_experts.expert_bytes(layout)     # what the kernel reads per expert (its GB/s)
        self.threads = min(threads or max(cpus - 1, 1), cpus)
        self.rates = CpuRates(prior_bps)
        self.counters = {"experts": 0, "bytes": 0, "seconds": 0.0, "wait_seconds": 0.0, "calls": 0}
        self._layer = np.zeros((n_layers, 3))                     # per layer: calls, kernel seconds, experts
        cpu_experts.warm_up()                                     # compile at load, not in the first decode step
        self.threading_layer = cpu_experts.threading_layer()      # numba's, which the kernel's threads come from

    def choose(self, host_missing: list[int], ids: np.ndarray, valid: np.ndarray, link_bps: float,
               copied_anyway: int) -> list[int]:
        """The policy's split (prefetch.split_cpu) of a layer's host-resident misses, at the kernel's measured rate
        for this step's rows: the experts the CPU computes."""
        rows = int(valid.sum())
        counts = np.bincount(ids[valid].reshape(-1), minlength=max(host_missing) + 1)
        cpu, _ = split_cpu(host_missing, rows, self.rates.rate(rows), link_bps, self.expert_bytes,
                           assignments={e: int(counts[e]) for e in host_missing}, copied_anyway=copied_anyway)
        return cpu

    def start(self, x: np.ndarray, buffers: list, experts: list[int], ids: np.ndarray, valid: np.ndarray) -> CpuJob:
        """The job of computing `experts` (their pinned buffers in `buffers`, held by the job until the kernel returns)
        for the assignments of ids [N, K] that route to them; `finish` runs it."""
        local = np.full(max(int(ids.max()), max(experts)) + 1, -1, np.int32)
        local[experts] = np.arange(len(experts), dtype=np.int32)
        assign = local[ids]
        assign[~valid] = -1                                       # padding rows route nowhere
        return CpuJob(frozenset(experts), assign, int(valid.sum()), np.asarray(x), tuple(buffers))

    def finish(self, layer: int, job: CpuJob) -> tuple[np.ndarray, np.ndarray]:
        """Run the job on this thread (the kernel releases the GIL; numba's threads run beside); count it and feed
        its rate to the policy's rates. Returns (float32 rows [N, K, D], mask [N, K] of the assignments they hold)."""
        t0 = time.perf_counter()
        y = cpu_experts.cpu_expert_rows(job.x, list(job.buffers), job.assign, self.layout, self.threads)
        seconds = time.perf_counter() - t0
        c = self.counters
        nbytes = len(job.experts) * self.expert_bytes
        self.rates.observe(job.rows, nbytes, seconds)
        c["experts"] += len(job.experts)
        c["bytes"] += nbytes
        c["seconds"] += seconds
        c["wait_seconds"] += time.perf_counter() - t0
        c["calls"] += 1
        self._layer[layer] += (1, seconds, len(job.experts))
        return y, job.assign >= 0

    def stats(self) -> dict[str, Any]:
        """numba's threading layer, experts and bytes computed on the CPU, the kernel's seconds and GB/s, the engine
        thread's time in it (wait_seconds), per layer the kernel's ms per call and the experts it computed, the rates
        the policy uses."""
        c = self.counters
        calls, seconds, experts = self._layer.T
        return {"threads": self.threads, "threading_layer": self.threading_layer, **c,
                "GB_per_s": c["bytes"] / c["seconds"] / 1e9 if c["seconds"] else None,
                "layer_ms": [float(1e3 * s / n) if n else None for n, s in zip(calls, seconds)],
                "layer_experts": [int(e) for e in experts],
                "rate_GB_per_s_by_rows": {str(r): v / 1e9 for r, v in sorted(self.rates.measured.items())}}

    def close(self) -> None:
        """Nothing to stop (numba's threads are the process's, shared)."""


@functools.partial(jax.jit, donate_argnums=(0,))
def take_rows(acc: jax.Array, rows: jax.Array, mask: jax.Array) -> jax.Array:
    """acc [N, K, D] with `rows` where mask [N, K] is set, in acc's dtype: the rows another path computed (the CPU
    experts', or another device's under tiered expert parallelism) merged into the first device's."""
    return jnp.where(mask[..., None], rows.astype(acc.dtype), acc)

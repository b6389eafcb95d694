"""Compiling a program before a step needs it, on a thread of its own.

A decode step's shape is its padded row count and the width of its page tables (the widest reservation among the
running requests: pages are reserved for prompt + max_new_tokens at admission), both bucketed to powers of two. A
request that joins can lead the batch to a shape it has not met, and compiled when the first such step needs it, that
shape stops every stream for the compile. So when requests are admitted the engine thread hands the lowerings of that
shape (`jit.lower(...)` on ShapeDtypeStructs made on the engine thread) to this module's thread, which compiles them
while the joining requests prefill. JAX keeps the compiled executable in its lowering and compilation caches (and the
persistent cache when it is on), so the later call with real arrays of those shapes runs without compiling
(tests/test_compile_ahead.py checks where each compile happens). Off by default (compute_config.compile_ahead): on a
2-core box the two threads' compiles only take turns, and on a GPU host it is not measured yet (bench/join_gaps.py).

Threads: the engine thread calls `submit`, `wait_for` and `close`; the compile thread only traces, lowers and compiles
the callables it is given: it never reads or writes engine state and runs none of its computations (on a GPU, XLA's
autotuner may time candidate kernels while compiling, as it does for the engine thread's own compiles). A failed
compile is counted and logged, never raised: the step that needs the shape then compiles it as before.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable

import jax

log = logging.getLogger(__name__)


MIN_CPUS = 4


def enabled(setting: bool | str) -> bool:
    """compute_config.compile_ahead: on, off, or auto = on where the process has at least MIN_CPUS CPUs. With fewer,
    the compile thread's compile competes with the engine thread's own (the joining prompt's prefill shape): on the
    2-core CPU box a running stream's stalls summed the same with it on (5.0 s against 4.9 s) and its longest grew
    (3.7 s against 2.5 s; bench/join_gaps.py)."""
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:              # not on Linux
            cpus = os.cpu_count() or 1
        return cpus >= MIN_CPUS
    return setting == "on"


def with_shape(a, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    """`a`'s abstract value (dtype, sharding, weak type) with `shape` (another batch's rows, a wider page table)."""
    return jax.ShapeDtypeStruct(shape, a.dtype, sharding=a.sharding, weak_type=getattr(a, "weak_type", False))


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs of a pytree of arrays: what a call with them would compile for."""
    return jax.tree.map(lambda a: with_shape(a, a.shape), tree)


class CompileAhead:
    """One background thread compiling lowerings handed to it, each key once."""

    def __init__(self, name: str = "dsjax-compile-ahead"):
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.submitted: set = set()          # engine thread only: keys asked for, or compiled by the calls themselves
        self._pending: dict = {}             # key -> Event set once the compile thread is done with it
        self.waited = 0.0                    # engine thread: seconds it waited for a compile in progress
        self._closing = False
        self.done = 0                        # written by the compile thread; read for stats
        self.failed = 0
        self.seconds = 0.0

    def submit(self, key, lower: Callable[[], Any]) -> bool:
        """Compile `lower()` (a jax Lowered) in the background unless `key` was submitted before. Engine thread."""
        if key in self.submitted:
            return False
        self.submitted.add(key)
        self._pending[key] = threading.Event()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._queue.put((key, lower))
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, lower = item
            if self._closing:                 # closed: what is still queued is dropped
                self._pending[key].set()
                continue
            t0 = time.perf_counter()
            try:
                lower().compile()
                self.done += 1
            except Exception as e:            # the step that needs it compiles it itself
                self.failed += 1
                log.warning("compile ahead of %s failed: %s", key, e)
            self.seconds += time.perf_counter() - t0
            self._pending[key].set()

    def wait_for(self, key) -> None:
        """Engine thread, about to run `key`'s shape: if the compile thread is compiling it, wait for that compile
        (it started earlier, so it ends sooner than a second compile of the same program on this thread)."""
        ev = self._pending.get(key)
        if ev is None:
            return
        if not ev.is_set():
            t0 = time.perf_counter()
            ev.wait()
            self.waited += time.perf_counter() - t0
        del self._pending[key]

    def stats(self) -> dict[str, Any]:
        return {"compiled": self.done, "failed": self.failed, "seconds": round(self.seconds, 3),
                "waited_s": round(self.waited, 3)}

    def close(self, timeout: float = 120.0) -> None:
        """Drop what is queued and wait for the compile in progress to end (a thread left inside XLA's compiler
        while the interpreter shuts down is not safe)."""
        if self._thread is not None:
            self._closing = True
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

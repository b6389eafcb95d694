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

The same pool, with `threads` compile threads, serves `Engine.warmup`: the call sites a warm-up step notes (attention)
are lowered for every later step's shape and compiled there while the engine thread runs the steps (compile_threads).

Threads: the engine thread calls `submit`, `wait_for` and `close`; a compile thread only traces, lowers and compiles
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


COMPILE_STACK = 64 << 20       # XLA compiles on these threads; LLVM recurses deeply (pthread default: 8 MB or less)
_stack_lock = threading.Lock()


def start_thread(target, args: tuple, name: str) -> threading.Thread:
    """A daemon thread with COMPILE_STACK bytes of stack (threading.stack_size is process-wide: set, start, restore)."""
    with _stack_lock:
        old = threading.stack_size(COMPILE_STACK)
        try:
            t = threading.Thread(target=target, args=args, name=name, daemon=True)
            t.start()
        finally:
            threading.stack_size(old)
    return t


def compile_threads(setting: int | None = None, platform: str | None = None) -> int:
    """Threads of the warm-up's compile pool: `setting`, or by default on the CPU backend one per CPU of the process
    but the engine thread's, at most 8 (1 on a 2-core box), and 0 on a GPU until measured there: XLA's GPU compiler
    times candidate kernels on the device while it compiles (autotuning), and compiles side by side could time them
    against each other and keep slower kernels (in the persistent cache too)."""
    if setting is not None:
        if setting < 0:
            raise ValueError(f"compile_threads={setting} must be >= 0 (0: every program on the engine thread)")
        return setting
    if (platform or jax.default_backend()) != "cpu":
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:                  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus - 1))


class CompileAhead:
    """Background threads (`threads` of them, started at the first submit) compiling lowerings handed to them, each
    key once, in the order submitted."""

    def __init__(self, name: str = "dsjax-compile-ahead", threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        self._name = name
        self._n = threads
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.submitted: set = set()          # engine thread only: keys asked for, or compiled by the calls themselves
        self._pending: dict = {}             # engine thread only: key -> Event set once a compile thread is done
        self.waited = 0.0                    # engine thread: seconds it waited for a compile in progress
        self._closing = False
        self._lock = threading.Lock()        # the counters below, written by the compile threads
        self.done = 0
        self.failed = 0
        self.seconds = 0.0

    def submit(self, key, lower: Callable[[], Any]) -> bool:
        """Compile `lower()` (a jax Lowered) in the background unless `key` was submitted before. Engine thread."""
        if key in self.submitted:
            return False
        self.submitted.add(key)
        ev = self._pending[key] = threading.Event()
        if not self._threads:
            self._threads = [start_thread(self._run, (), f"{self._name}-{k}") for k in range(self._n)]
        self._queue.put((key, lower, ev))
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, lower, ev = item
            if self._closing:                 # closed: what is still queued is dropped
                ev.set()
                continue
            t0 = time.perf_counter()
            ok = True
            try:
                lower().compile()
            except Exception as e:            # the step that needs it compiles it itself
                ok = False
                log.warning("compile ahead of %s failed: %s", key, e)
            with self._lock:
                self.done += ok
                self.failed += not ok
                self.seconds += time.perf_counter() - t0
            ev.set()

    def wait_for(self, key) -> None:
        """Engine thread, about to run `key`'s shape: if a compile thread is compiling it (or has it queued), wait for
        that compile (it started earlier, so it ends sooner than a second compile of the same program here)."""
        ev = self._pending.get(key)
        if ev is None:
            return
        if not ev.is_set():
            t0 = time.perf_counter()
            ev.wait()
            self.waited += time.perf_counter() - t0
        del self._pending[key]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"compiled": self.done, "failed": self.failed, "seconds": round(self.seconds, 3),
                    "waited_s": round(self.waited, 3), "threads": self._n}

    def close(self, timeout: float = 120.0) -> None:
        """Drop what is queued and wait for the compiles in progress to end (a thread left inside XLA's compiler
        while the interpreter shuts down is not safe)."""
        if self._threads:
            self._closing = True
            for _ in self._threads:
                self._queue.put(None)
            for t in self._threads:
                t.join(timeout)
            self._threads = []

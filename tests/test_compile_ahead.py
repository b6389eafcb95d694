"""Decode shapes compiled ahead (dsjax/runtime/compile_ahead.py): when a request joins, the decode shape it leads to
(batch rows, page-table width) is lowered and compiled on the compile thread while the request prefills, and the
engine thread's decode step then runs that executable without compiling it again.

Oracle: JAX's own compile log. Every lowering logs its function and argument shapes on the thread that lowers it
(jax._src.interpreters.pxla, "Compiling %s with global shapes and types %s"), and every XLA compile reports
'/jax/core/compile/backend_compile_duration' with the function's name on the thread that compiles. Without compile
ahead the decode shape below is lowered and compiled on the engine thread (checked: the test fails with
compile_ahead off). Each engine uses a KV pool of its own size, so no earlier test in the process compiled its
programs."""

import logging
import threading

import jax
import numpy as np
import pytest

import dsjax
from dsjax.runtime.compile_ahead import CompileAhead
from dsjax.runtime.engine import Engine
from dsjax.store.reader import Store

PROMPT = [5, 17, 33, 2, 9]
LONG = 253                  # PROMPT + LONG - 1 = 257 positions written: 5 pages of 64


class CompileLog:
    """(thread name, function, argument shapes) of each lowering, (thread name, function) of each XLA compile."""

    def __init__(self):
        self.lowered: list[tuple[str, str, list[tuple]]] = []
        self.compiled: list[tuple[str, str]] = []
        self._on = False

    def __enter__(self):
        log = self

        class Handler(logging.Handler):
            def emit(self, record):
                if log._on and record.msg.startswith("Compiling %s with global shapes"):
                    name, avals = record.args[0], record.args[1]
                    log.lowered.append((threading.current_thread().name, str(name),
                                        [tuple(getattr(a, "shape", ())) for a in avals]))

        self._logger = logging.getLogger("jax._src.interpreters.pxla")
        self._level = self._logger.level
        self._handler = Handler(logging.DEBUG)
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.DEBUG)

        def listener(event, duration, fun_name=None, **kw):
            if log._on and event == "/jax/core/compile/backend_compile_duration":
                log.compiled.append((threading.current_thread().name, str(fun_name)))
        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        self._on = True
        return self

    def __exit__(self, *exc):
        self._on = False
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)
        jax.monitoring.unregister_event_duration_listener(self._listener)

    def lowered_on(self, thread_prefix: str, fun: str, *shapes) -> list:
        return [lw for lw in self.lowered if lw[0].startswith(thread_prefix) and fun in lw[1]
                and all(s in lw[2] for s in shapes)]

    def compiles_on(self, thread_prefix: str, fun: str) -> int:
        return sum(1 for t, f in self.compiled if t.startswith(thread_prefix) and fun in f)


def _check(engine: Engine, fun: str, decode_shapes: tuple):
    """Warm the engine with a short request (page tables 1 wide), then run one whose 145 tokens reserve 3 pages (a
    4-wide page table): its decode shape is new and must come from the compile thread."""
    engine.generate([PROMPT], max_new_tokens=3)
    with CompileLog() as log:
        out = engine.generate([PROMPT], max_new_tokens=LONG)
    assert out[0].token_ids           # (it may stop early: the pages are reserved for prompt + max_new_tokens)
    ahead = engine.stats()["steps"]["compile_ahead"]
    # the decode shape [1 row, 8 pages] was lowered on the compile thread, never on the engine thread
    assert log.lowered_on("dsjax-compile-ahead", fun, *decode_shapes), log.lowered
    assert not log.lowered_on("dsjax-engine", fun, *decode_shapes), log.lowered
    assert ahead["compiled"] >= 1 and ahead["failed"] == 0
    # every XLA compile of these programs on the engine thread is of a shape it lowered itself (the prefill's): none
    # compiles again what the compile thread built
    engine_lowered = len(log.lowered_on("dsjax-engine", fun))
    assert log.compiles_on("dsjax-engine", fun) == engine_lowered
    assert log.compiles_on("dsjax-compile-ahead", fun) >= 1
    return out


def test_in_memory_engine_decodes_a_new_shape_compiled_ahead(store):
    st = Store(store)
    weights = st.load_weights(np.float32, "device")
    engine = Engine(st.config, weights, max_batch_size=3, max_context=320, name="shakespeare", compile_ahead="on")
    try:
        out = _check(engine, "layer_step", ((1, 1), (1, 8)))       # positions [1, 1], page table [1, 8]
        ref = Engine(st.config, weights, max_batch_size=3, max_context=320, compile_ahead=False)
        try:     # the same tokens without compile ahead
            assert ref.generate([PROMPT], max_new_tokens=LONG)[0].token_ids == out[0].token_ids
            assert "compile_ahead" not in ref.stats()["steps"]
        finally:
            ref.close()
    finally:
        engine.close()


def test_tiered_engine_decodes_a_new_shape_compiled_ahead(store):
    from dsjax.demo import demo_budgets
    b = demo_budgets(store)
    engine = dsjax.load(store, gpu_memory=int(b["gpu_memory"] * 1.5), host_memory="2GB", cpu_experts="off",
                        max_batch_size=3, max_context=320, compile_ahead="on")
    try:
        _check(engine, "_attn", ((1, 1), (1, 8)))
    finally:
        engine.close()


def test_auto_is_on_with_enough_cpus_and_a_wrong_value_is_an_error(monkeypatch):
    import os

    from dsjax.runtime import compile_ahead
    from dsjax.runtime.config import RuntimeConfig, RuntimeConfigError
    assert compile_ahead.enabled("on") and not compile_ahead.enabled("off") and compile_ahead.enabled(True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(compile_ahead.MIN_CPUS)))
    assert compile_ahead.enabled("auto")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert not compile_ahead.enabled("auto")
    with pytest.raises(RuntimeConfigError, match="compile_ahead='sometimes' must be one of auto, on, off"):
        RuntimeConfig.from_preset("balanced", compile_ahead="sometimes")
    assert RuntimeConfig.from_preset("balanced", compile_ahead=False).compute_config.compile_ahead == "off"


def test_a_failed_compile_is_counted_not_raised_and_waiting_for_it_returns():
    ahead = CompileAhead()
    started = threading.Event()

    class Lowered:
        def compile(self):
            started.set()
            raise RuntimeError("no such shape")

    assert ahead.submit(("k", 1), lambda: Lowered())
    assert not ahead.submit(("k", 1), lambda: Lowered())       # each key once
    assert started.wait(10)
    ahead.wait_for(("k", 1))                                    # returns once the compile thread is done with it
    assert ahead.stats()["failed"] == 1 and ahead.stats()["compiled"] == 0
    ahead.wait_for(("never", 0))                                # a key never submitted: nothing to wait for
    ahead.close()


def test_close_drops_what_is_queued_and_joins_the_thread():
    ahead = CompileAhead()
    gate, ran = threading.Event(), []

    class Slow:
        def __init__(self, i):
            self.i = i

        def compile(self):
            ran.append(self.i)
            gate.wait(10)

    for i in range(3):
        ahead.submit(("slow", i), lambda i=i: Slow(i))
    while not ran:                                  # the first one is compiling, two are queued
        threading.Event().wait(0.01)
    thread = ahead._threads[0]
    threading.Timer(0.2, gate.set).start()
    ahead.close()
    assert not thread.is_alive() and ran == [0]     # waited for the one in progress, dropped the other two
    ahead.wait_for(("slow", 2))                     # a dropped key does not block the engine thread


def test_compile_ahead_off_in_compute_config(store):
    engine = dsjax.load(store, gpu_memory="64MB", host_memory="2GB", compile_ahead="off", cpu_experts="off")
    try:
        assert engine.compile_ahead is None
        assert len(engine.generate([PROMPT], max_new_tokens=4)[0].token_ids) == 4
    finally:
        engine.close()


def test_requests_from_several_threads_joining_a_batch_get_the_tokens_of_compile_ahead_off(store):
    """Three threads submit requests of different lengths (each joining leads the batch to another shape, compiled on
    the compile thread while the engine thread steps): every result equals the same request on an engine without
    compile ahead, run one at a time."""
    from dsjax.demo import demo_budgets
    b = demo_budgets(store)
    kw = dict(gpu_memory=int(b["gpu_memory"] * 1.5), host_memory="2GB", cpu_experts="off", max_batch_size=4,
              max_context=384, dtype="float32")     # float32: a row's tokens do not depend on its batch's others
    jobs = [([5, 17, 33, 2, 9], 30), ([7, 7, 100, 4], 120), ([11, 3, 250], 200)]
    engine = dsjax.load(store, compile_ahead="on", **kw)
    try:
        engine.generate([jobs[0][0]], max_new_tokens=2)          # a first decode shape: the call sites are known
        got: dict[int, list[int]] = {}

        def run(i):
            got[i] = engine.generate([jobs[i][0]], max_new_tokens=jobs[i][1])[0].token_ids
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.stats()["steps"]["compile_ahead"]["compiled"] >= 1
    finally:
        engine.close()
    ref = dsjax.load(store, compile_ahead="off", **kw)
    try:
        for i, (prompt, n) in enumerate(jobs):
            assert got[i] == ref.generate([prompt], max_new_tokens=n)[0].token_ids, i
    finally:
        ref.close()


def test_a_pool_of_threads_compiles_side_by_side_each_key_once():
    ahead = CompileAhead("test-pool", threads=2)
    both = threading.Barrier(2, timeout=10)         # passes only while two compiles are in progress at once
    calls = []

    class Meets:
        def __init__(self, i):
            self.i = i

        def compile(self):
            calls.append(self.i)
            both.wait()

    assert ahead.submit(("a",), lambda: Meets(0)) and ahead.submit(("b",), lambda: Meets(1))
    assert not ahead.submit(("a",), lambda: Meets(2))
    ahead.wait_for(("a",))
    ahead.wait_for(("b",))
    assert ahead.stats() | {"seconds": 0, "waited_s": 0} == {"compiled": 2, "failed": 0, "seconds": 0, "waited_s": 0,
                                                             "threads": 2}
    assert sorted(calls) == [0, 1]
    ahead.close()
    with pytest.raises(ValueError, match="threads=0 must be >= 1"):
        CompileAhead(threads=0)

"""Engine.warmup: the step shapes of requests up to given lengths are compiled before they run, so requests inside
those lengths compile nothing on the engine thread (where a compile stalls every running request), and a warmed
engine gives the tokens of one that was not.

Oracle: JAX's own lowering log (jax._src.interpreters.pxla logs "Compiling %s with global shapes ..." on the thread
that lowers a new program), not the engine's counter. The same traffic on an engine without warm-up lowers programs
on its engine thread (so the check can fail). The two engines have different budgets (KV pool and expert slot pool
sizes), so the first one's programs are not the second one's."""

import logging
import threading

import numpy as np

import dsjax

MAX_PROMPT, MAX_NEW = 70, 8
PROMPTS = [(list(range(5, 75)), 8), (list(range(40, 60)), 5), (list(range(7, 77)), 8), ([9, 4, 11], 3),
           (list(range(100, 166)), 6)]


class Lowerings:
    """Names of the programs lowered on threads whose name starts with `prefix`, while inside the block."""

    def __init__(self, prefix: str):
        self.prefix, self.names = prefix, []

    def __enter__(self):
        log = self

        class Handler(logging.Handler):
            def emit(self, record):
                if record.msg.startswith("Compiling %s with global shapes") and \
                        threading.current_thread().name.startswith(log.prefix):
                    log.names.append(f"{record.args[0]} {[tuple(getattr(a, 'shape', ())) for a in record.args[1]]}")
        self._logger = logging.getLogger("jax._src.interpreters.pxla")
        self._level, self._handler = self._logger.level, Handler(logging.DEBUG)
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)


def _traffic(engine) -> list[list[int]]:
    """A stream decodes; three requests join it from other threads (one long enough to be prefilled in chunks beside
    it); then one arrives alone."""
    out: dict[int, list[int]] = {}
    started = threading.Event()

    def run(j):
        toks = []
        for ev in engine.stream([PROMPTS[j][0]], max_new_tokens=PROMPTS[j][1]):
            toks.append(ev.token_id)
            if j == 0 and len(toks) == 2:
                started.set()
        out[j] = toks
    first = threading.Thread(target=run, args=(0,))
    first.start()
    started.wait()
    joiners = [threading.Thread(target=run, args=(j,)) for j in (1, 2, 3)]
    for t in joiners:
        t.start()
    for t in [first] + joiners:
        t.join()
    run(4)
    return [out[j] for j in range(len(PROMPTS))]


def _load(store, scale: float):
    from dsjax.demo import demo_budgets
    b = demo_budgets(store)
    return dsjax.load(store, gpu_memory=int(b["gpu_memory"] * scale), host_memory="2GB", cpu_experts="off",
                      max_batch_size=2, max_context=128, step_tokens=64)


def test_warmed_engine_compiles_nothing_for_requests_within_its_lengths_and_gives_the_same_tokens(store):
    cold = _load(store, 1.5)
    try:
        with Lowerings("dsjax-engine") as log:
            ref = _traffic(cold)
        assert log.names, "the unwarmed engine compiled nothing: the check below could not fail"
        ref_activations = cold.stats()["expert_activations"]
    finally:
        cold.close()
    warm = _load(store, 1.7)
    try:
        assert (warm.kv.pages, warm.experts.slots.capacity) != (cold.kv.pages, cold.experts.slots.capacity)
        with Lowerings("dsjax-engine") as wlog:
            r = warm.warmup(max_prompt=MAX_PROMPT, max_new_tokens=MAX_NEW)
        assert r["programs"] == len(wlog.names) > 0 and r["steps"] > 0 and r["seconds"] > 0
        before = warm.stats()["steps"]["compiles"]["programs"]
        with Lowerings("dsjax-engine") as log:
            got = _traffic(warm)
        assert log.names == [], f"compiled on the engine thread after warmup: {log.names}"
        assert warm.stats()["steps"]["compiles"]["programs"] == before
        assert got == ref                 # warm-up steps wrote no cache and left no state behind
        # and the warm-up's padding rows counted no expert activation (popularity, hit rates stay the requests')
        assert warm.stats()["expert_activations"] == ref_activations
    finally:
        warm.close()


def test_warmup_of_the_in_memory_engine_and_bad_arguments(store):
    import pytest

    from dsjax.runtime.engine import Engine
    from dsjax.store.reader import Store
    st = Store(store)
    e = Engine(st.config, st.load_weights(np.float32, "device"), max_batch_size=2, max_context=72, step_tokens=64)
    try:
        with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
            e.warmup(max_prompt=8, max_new_tokens=0)
        e.warmup(max_prompt=24, max_new_tokens=4)
        with Lowerings("dsjax-engine") as log:
            got = [e.generate([p[:24]], max_new_tokens=4)[0].token_ids for p, _ in PROMPTS[:2]]
        assert log.names == [], f"compiled on the engine thread after warmup: {log.names}"
        assert all(got)
    finally:
        e.close()

"""Engine.warmup: the step shapes of requests up to given lengths are compiled before they run, so requests inside
those lengths compile nothing on the engine thread (where a compile stalls every running request), and a warmed
engine gives the tokens of one that was not.

Oracle: JAX's own lowering log (jax._src.interpreters.pxla logs "Compiling %s with global shapes ..." on the thread
that lowers a new program), not the engine's counter. A prompt longer than the warmed ones lowers programs on the
engine thread (so the check can fail). The warmed engine's budget is used by no other test, so no program it
needs was compiled before it by another engine in the process."""

import logging
import threading

import numpy as np
import pytest

import dsjax

MAX_PROMPT, MAX_NEW = 40, 30
# the first decodes while the next three join it (two rows: one at a time) and finish; the last comes alone
PROMPTS = [(list(range(6, 46)), 30), (list(range(40, 60)), 5), (list(range(7, 47)), 8), ([9, 4, 11], 3),
           (list(range(100, 136)), 6)]


class Lowerings:
    """Names of the programs lowered on threads whose name starts with `prefix`, while inside the block."""

    def __init__(self, prefix: str):
        self.prefix, self.lowered = prefix, []          # (program, argument shapes)

    @property
    def names(self) -> list[str]:
        return [f"{name} {shapes}" for name, shapes in self.lowered]

    def __enter__(self):
        log = self

        class Handler(logging.Handler):
            def emit(self, record):
                if record.msg.startswith("Compiling %s with global shapes") and \
                        threading.current_thread().name.startswith(log.prefix):
                    log.lowered.append((str(record.args[0]), [tuple(getattr(a, "shape", ())) for a in record.args[1]]))
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
    it) and end before it does (no end-of-text stop: nothing is left prefilling without it, several prompts
    prefilled together are not warmed); then one arrives alone."""
    out: dict[int, list[int]] = {}
    started = threading.Event()

    def run(j):
        toks = []
        try:
            for ev in engine.stream([PROMPTS[j][0]], max_new_tokens=PROMPTS[j][1], stop_token_ids=()):
                toks.append(ev.token_id)
                if j == 0 and len(toks) == 2:
                    started.set()
        finally:
            started.set()                  # a failed first stream must not leave the joiners waiting
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
    # every stream ran to its max_new_tokens (a thread's own assert would only warn): no end-of-text cut any short
    assert [len(out[j]) for j in range(len(PROMPTS))] == [n for _, n in PROMPTS], out
    return [out[j] for j in range(len(PROMPTS))]


def _load(store, scale: float):
    from dsjax.demo import demo_budgets
    b = demo_budgets(store)
    return dsjax.load(store, gpu_memory=int(b["gpu_memory"] * scale), host_memory="2GB", cpu_experts="off",
                      max_batch_size=2, max_context=128, step_tokens=32)


def test_warmed_engine_compiles_nothing_for_requests_within_its_lengths_and_gives_the_same_tokens(store):
    from dsjax.runtime.sampler import _choose
    _choose.clear_cache()            # the sampler's programs do not depend on the budget: earlier tests compiled them
    warm = _load(store, 1.7)
    try:
        with Lowerings("dsjax-engine") as wlog, Lowerings("dsjax-warmup-compile") as plog:
            r = warm.warmup(max_prompt=MAX_PROMPT, max_new_tokens=MAX_NEW, compile_threads=2)
        assert r["engine_thread"]["programs"] == len(wlog.names) > 0 and r["steps"] > 0 and r["seconds"] > 0
        # the compile threads took the attention programs of the later steps and the sampler's; each program was
        # lowered once
        assert r["threads"] == 2 and r["compile_threads"]["programs"] == len(plog.names) > 0
        assert {n.split(" ")[0] for n in plog.names} == {"jit(_attn)", "jit(_choose)"}, plog.names
        assert r["programs"] == len(wlog.names) + len(plog.names)
        assert not set(wlog.names) & set(plog.names), set(wlog.names) & set(plog.names)
        # both ways a tiered step runs a layer's experts, for every rows shape: in one call with the combine
        # (_moe_rows_out: slot ids are its 5th argument from the end) and in chunks (_moe_rows: 3rd from the end).
        # The traffic below only meets the first (this model's 16 experts always fit the slots), so this checks the
        # second from the log.
        one_call = {shapes[-5] for name, shapes in wlog.lowered if name == "jit(_moe_rows_out)"}
        chunked = {shapes[-3] for name, shapes in wlog.lowered if name == "jit(_moe_rows)"}
        assert one_call and one_call <= chunked, (one_call, chunked)
        before = warm.stats()["steps"]["compiles"]["programs"]
        with Lowerings("dsjax-engine") as log:
            got = _traffic(warm)
        assert log.names == [], f"compiled on the engine thread after warmup: {log.names}"
        assert warm.stats()["steps"]["compiles"]["programs"] == before
        activations = warm.stats()["expert_activations"]
        # the check can fail: a prompt longer than the warmed ones (a new prompt bucket) lowers programs there
        with Lowerings("dsjax-engine") as log:
            warm.generate([list(range(3, 103))], max_new_tokens=2)
        assert log.names and warm.stats()["steps"]["compiles"]["programs"] == before + len(log.names)
    finally:
        warm.close()
    # an unwarmed engine of the same budget (its programs compiled by now: the same arithmetic): the same tokens (the
    # warm-up's steps wrote no cache and left no state behind) and the same expert activations (its padding rows
    # counted none: popularity and hit rates stay the requests')
    same = _load(store, 1.7)
    try:
        assert _traffic(same) == got
        assert same.stats()["expert_activations"] == activations
    finally:
        same.close()


def test_warmup_of_the_in_memory_engine_and_bad_arguments(store):
    import pytest

    from dsjax.runtime.engine import Engine
    from dsjax.store.reader import Store
    st = Store(store)
    e = Engine(st.config, st.load_weights(np.float32, "device"), max_batch_size=2, max_context=72, step_tokens=64)
    try:
        with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
            e.warmup(max_prompt=8, max_new_tokens=0)
        with pytest.raises(ValueError, match="max_prompt=0 must be >= 1"):
            e.warmup(max_prompt=0)
        e.warmup(max_prompt=24, max_new_tokens=4)
        with Lowerings("dsjax-engine") as log:
            got = [e.generate([p[:24]], max_new_tokens=4)[0].token_ids for p, _ in PROMPTS[:2]]
        assert log.names == [], f"compiled on the engine thread after warmup: {log.names}"
        assert all(got)
    finally:
        e.close()


def test_warmup_covers_prompts_arriving_together_up_to_its_bursts(store):
    """A list of prompts given at once to an idle engine is prefilled in one step, whole and side by side (one shape
    per count bucket and prompt bucket): warmup(bursts=2) covers two such prompts (nothing lowered, the tokens of each
    prompt alone), not three (a 4-row step: lowered on first use, so the check can fail)."""
    from dsjax.runtime.engine import Engine
    from dsjax.store.reader import Store
    st = Store(store)
    e = Engine(st.config, st.load_weights(np.float32, "device"), max_batch_size=4, max_context=56, step_tokens=64)
    try:
        r = e.warmup(max_prompt=24, max_new_tokens=4, bursts=2, compile_threads=0)    # every program on this thread
        assert r["threads"] == 0 and r["programs"] == r["engine_thread"]["programs"] > 0
        pair = [PROMPTS[0][0][:24], PROMPTS[1][0][:13]]
        with Lowerings("dsjax-engine") as log:
            together = [g.token_ids for g in e.generate(pair, max_new_tokens=4, stop_token_ids=())]
        assert log.names == [], f"compiled on the engine thread after warmup: {log.names}"
        alone = [e.generate([p], max_new_tokens=4, stop_token_ids=())[0].token_ids for p in pair]
        assert together == alone and all(len(t) == 4 for t in together)
        with Lowerings("dsjax-engine") as log:
            e.generate(pair + [PROMPTS[3][0]], max_new_tokens=4, stop_token_ids=())
        assert log.names, "three prompts at once (4 rows) were not warmed, yet nothing was lowered"
        with pytest.raises(ValueError, match="bursts=0 must be >= 1"):
            e.warmup(max_prompt=8, bursts=0)
        with pytest.raises(ValueError, match="compile_threads=-1 must be >= 0"):
            e.warmup(max_prompt=8, compile_threads=-1)
    finally:
        e.close()


def test_page_tables_are_at_least_min_table_tokens_wide_and_the_tokens_do_not_depend_on_it(store):
    """A short request's steps run with page tables MIN_TABLE_TOKENS wide (4 pages: one shape where widths 1, 2 and 4
    were three); the pages past its own are padding that attention masks, so its tokens equal those of an engine whose
    tables follow each request's pages (min_table_tokens=64)."""
    from dsjax.runtime.engine import MIN_TABLE_TOKENS, Engine
    from dsjax.runtime.kv_pool import PAGE_TOKENS
    from dsjax.store.reader import Store
    assert MIN_TABLE_TOKENS == 4 * PAGE_TOKENS
    st = Store(store)
    weights = st.load_weights(np.float32, "device")
    got = {}
    for floor in (MIN_TABLE_TOKENS, PAGE_TOKENS):
        e = Engine(st.config, weights, max_batch_size=2, max_context=312, step_tokens=64, min_table_tokens=floor)
        try:
            with Lowerings("dsjax-engine") as log:
                got[floor] = [g.token_ids for g in e.generate([PROMPTS[3][0], PROMPTS[1][0]], max_new_tokens=6,
                                                              stop_token_ids=())]
            tables = {shapes[-1] for name, shapes in log.lowered if name == "jit(layer_step)"}
            assert tables == ({(2, 4)} if floor == MIN_TABLE_TOKENS else {(2, 1)}), tables
        finally:
            e.close()
    assert got[MIN_TABLE_TOKENS] == got[PAGE_TOKENS] and all(len(t) == 6 for t in got[PAGE_TOKENS])


def test_warmup_covers_top_k_top_p_and_logprobs_unless_told_not_to(store):
    """A server's first request with top_p (chat UIs send 0.9-0.95) or logprobs (lm-eval) compiles nothing on the
    engine thread after warmup(); with sampling=False the same requests lower the sampler's other programs there (so
    the check can fail)."""
    from dsjax.runtime.engine import Engine
    from dsjax.runtime.sampler import _choose
    from dsjax.store.reader import Store
    st = Store(store)
    asks = [dict(temperature=0.8, top_p=0.9, seed=1), dict(temperature=1.0, top_k=5, seed=2), dict(logprobs=3),
            dict(temperature=0.7, top_p=0.95, logprobs=1, seed=3)]
    lowered = {}
    for sampling, threads in ((False, 0), (True, 0), (True, 2)):      # 2: the sampler's programs on compile threads
        _choose.clear_cache()                 # programs an earlier test (or the loop's first engine) compiled
        e = Engine(st.config, st.load_weights(np.float32, "device"), max_batch_size=2, max_context=40, step_tokens=64)
        try:
            e.warmup(max_prompt=16, max_new_tokens=4, compile_threads=threads, sampling=sampling)
            with Lowerings("dsjax-engine") as log:
                for kw in asks:
                    g = e.generate([PROMPTS[1][0][:12]], max_new_tokens=3, stop_token_ids=(), **kw)[0]
                    assert len(g.token_ids) == 3
            lowered[sampling, threads] = log.names
        finally:
            e.close()
    for threads in (0, 2):
        assert lowered[True, threads] == [], f"compiled on the engine thread after warmup: {lowered[True, threads]}"
    assert lowered[False, 0] and all(n.startswith("jit(_choose)") for n in lowered[False, 0]), lowered[False, 0]

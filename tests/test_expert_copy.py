"""compute_config.expert_copy (issue 20, item 1): a layer's GPU misses copied inside the slot write's executable
("jit") instead of a device_put per expert then a slot write ("put", the default).

Oracles: the tokens and logits of the same engine with "put", the host->GPU byte counters, the cache's own count of
experts copied inside the write.
"""

import numpy as np
import pytest

import dsjax
from dsjax.runtime.config import RuntimeConfigError
from dsjax.runtime.expert_layout import ExpertLayout
from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
from dsjax.runtime.tiered import model_bytes_from_store
from dsjax.store.reader import Store

PROMPTS = [np.random.default_rng(3).integers(2, 480, n).tolist() for n in (5, 17, 30)]


def _budget(store, **over):
    """~10 GPU expert slots for 3 MoE layers x 16 experts (LRFU evicts every step: every decode step copies), every
    expert in the pinned host cache, or only part of them (`host_memory` given): reads from disk then feed copies."""
    s = Store(store)
    mb = model_bytes_from_store(s, "float32")
    nb = ExpertLayout.of_store(s, 1).nbytes
    g = minimum_gpu_memory(mb, context_tokens=128, max_gpu_layers=1, prefetch_layers=1)
    return dict(dict(gpu_memory=g + 4 * nb * 10, host_memory=100 * minimum_host_memory(mb), max_gpu_layers=1,
                     prefetch_layers=1, max_context=128), **over)


def _run(store, **kw):
    e = dsjax.load(store, dtype="float32", **kw)
    gens = e.generate(PROMPTS, max_new_tokens=12, stop_token_ids=(), logprobs=1)
    s = e.stats()
    e.close()
    return gens, s


@pytest.mark.parametrize("mode", [dict(overlap_io=False), dict(), dict(host="small")],
                         ids=["on_demand", "prefetch", "disk"])
def test_copies_inside_the_write_give_the_same_tokens(store, mode):
    kw = dict(mode)
    if kw.pop("host", None):        # room for a third of the experts on the host: misses read from disk first
        s = Store(store)
        mb = model_bytes_from_store(s, "float32")
        kw["host_memory"] = minimum_host_memory(mb) + 16 * ExpertLayout.of_store(s, 1).nbytes * 2
    put, s_put = _run(store, **_budget(store, **kw, expert_copy="put"))
    jit, s_jit = _run(store, **_budget(store, **kw, expert_copy="jit"))
    assert [g.token_ids for g in jit] == [g.token_ids for g in put]
    for a, b in zip(jit, put):
        np.testing.assert_allclose([t[0] for t in a.logprobs], [t[0] for t in b.logprobs], atol=1e-5)
    assert s_put["expert_copy"] == {"mode": "put", "in_write": 0}
    assert s_jit["expert_copy"]["mode"] == "jit"
    # every expert loaded on demand went through the write: the misses of every MoE layer of every step
    assert s_jit["expert_copy"]["in_write"] > 0
    h2d = lambda s: s["links"]["host->GPU"]["bytes"]  # noqa: E731
    if mode == dict(overlap_io=False):          # no prediction: the same experts cross, whichever way
        assert h2d(s_jit) == h2d(s_put)
        nb = ExpertLayout.of_store(Store(store), 1).nbytes
        assert s_jit["expert_copy"]["in_write"] * nb <= h2d(s_jit)      # the rest: streamed layer weights
    if "host" in mode:                          # the copies' buffers came from disk reads
        assert s_jit["links"]["disk->host"]["bytes"] > 0


def test_a_bad_expert_copy_names_the_choices(store):
    with pytest.raises(RuntimeConfigError, match=r"compute_config.expert_copy='dma' must be one of put, jit"):
        dsjax.load(store, dtype="float32", **_budget(store, expert_copy="dma"))

"""The CPU expert path in the engine (issue 24): host-resident experts that miss the GPU computed on the CPU at
decode-sized steps give the greedy tokens of the copy path; the stats count what the CPU computed; 'auto' stays off on
a CPU backend; the config keys are validated; the planner counts the path."""

import dataclasses

import pytest

import dsjax
from dsjax.runtime.config import RuntimeConfig, RuntimeConfigError
from dsjax.runtime.planner import Links, ModelBytes, minimum_gpu_memory, minimum_host_memory, plan
from dsjax.runtime.tiered import model_bytes_from_store
from dsjax.store.reader import Store

PROMPTS = [[0, 17, 42, 99, 7, 3, 250, 11, 80, 5, 6, 120], [0, 5, 6], [0, 301, 2, 2, 9], [0, 77]]
# A slow host->GPU link: the policy (split_cpu) then sends host-resident misses to the CPU even on this machine.
SLOW_LINK = Links(h2d=1e6)


@pytest.fixture(scope="module")
def tight(store):
    """The fewest GPU expert slots the planner accepts and a host cache that holds every expert, filled at load:
    decode steps miss the GPU on experts that sit in pinned host memory."""
    mb = model_bytes_from_store(Store(store), "float32")
    g = minimum_gpu_memory(mb, context_tokens=512, max_gpu_layers=1, prefetch_layers=1)
    return dict(gpu_memory=g, host_memory=4 * minimum_host_memory(mb), max_gpu_layers=1, prefetch_layers=1,
                preload_experts=True)


def _run(store, tight, mode, links=SLOW_LINK):
    e = dsjax.load(store, dtype="float32", cpu_experts=mode, links=links, **tight)
    try:
        tokens = [g.token_ids for g in e.generate(PROMPTS, max_new_tokens=8, stop_token_ids=())]
        return tokens, e.stats(), e.stats_prometheus()
    finally:
        e.close()


@pytest.fixture(scope="module")
def copied(store, tight):
    return _run(store, tight, "off")


def test_cpu_experts_give_the_tokens_of_the_copy_path(store, tight, copied):
    tokens, stats, _ = copied
    assert stats["cpu_experts"]["experts"] == 0 and stats["cpu_experts"]["reason"] == "off"
    assert stats["hit_rates"]["gpu"] < 1.0 and stats["hit_rates"]["host"] == 1.0   # misses, all from the host
    on_tokens, on, prom = _run(store, tight, "on")
    assert on_tokens == tokens
    c = on["cpu_experts"]
    assert c["enabled"] == 1 and c["experts"] > 0 and c["calls"] > 0 and c["seconds"] > 0
    assert c["bytes"] == c["experts"] * (c["bytes"] // c["experts"]) and c["GB_per_s"] > 0
    assert sum(c["layer_experts"]) == c["experts"]
    moe = [i for i, n in enumerate(c["layer_experts"]) if n]
    assert moe and all(c["layer_ms"][i] > 0 for i in moe) and c["layer_ms"][0] is None      # layer 0 is dense
    assert c["rate_GB_per_s_by_rows"]                                                       # measured rates
    import numba
    assert c["threading_layer"] == numba.threading_layer()                 # where the kernel's threads came from
    assert on["links"]["cpu->GPU"]["bytes"] > 0
    # the host->GPU link moved fewer expert bytes than with the copies alone
    assert on["links"]["host->GPU"]["bytes"] < copied[1]["links"]["host->GPU"]["bytes"]
    assert f"dsjax_cpu_experts_experts {c['experts']}" in prom


def test_auto_stays_off_on_a_cpu_backend(store, tight, copied):
    tokens, stats, _ = _run(store, tight, "auto")
    assert tokens == copied[0]
    assert stats["cpu_experts"]["enabled"] == 0 and stats["cpu_experts"]["experts"] == 0
    assert stats["cpu_experts"]["reason"] == "a CPU backend"


def test_auto_builds_the_path_where_the_batch_1_plan_predicts_no_gain(store, tight, copied, monkeypatch):
    """On a GPU the batch-1 plan can predict no gain where larger batches gain (H100 run 7: 0.75x at batch 1, 1.29x at
    batch 8): under auto the path is built anyway and the CPU trial decides per batch bucket; the predicted tok/s stays
    the GPU-only plan's. (auto is off on a CPU backend: availability is made to answer as on a GPU.)"""
    from dsjax.runtime import tiered
    monkeypatch.setattr(tiered, "availability", lambda mode, layout, platform: (mode != "off", mode))
    # the default links: the plan's split gives the CPU a sliver of the bytes, a gain far under 2%: none
    e = dsjax.load(store, dtype="float32", cpu_experts="auto", links=Links(), **tight)
    try:
        assert e.cpu_path is not None and e.policy.cpu_trial
        assert e.placement.cpu_bytes_per_token == 0                      # the plan's figure: GPU only
        tokens = [g.token_ids for g in e.generate(PROMPTS, max_new_tokens=8, stop_token_ids=())]
        c = e.stats()["cpu_experts"]
        assert c["reason"] == "the plan predicts no gain at batch 1; the CPU trial decides per batch"
        assert c["enabled"] == 1
    finally:
        e.close()
    assert tokens == copied[0]
    # where the plan predicts a gain (a slow link), the plan counts the path
    e = dsjax.load(store, dtype="float32", cpu_experts="auto", links=SLOW_LINK, **tight)
    try:
        assert e.cpu_path is not None and e.placement.cpu_bytes_per_token > 0
        assert e.stats()["cpu_experts"]["reason"] == "auto"
    finally:
        e.close()


def test_the_cpu_trial_times_decode_steps_both_ways_and_keeps_the_tokens(store, tight):
    """Under auto the policy's CPU trial (cpu_trial; auto itself stays off on a CPU backend, so it is switched on here
    beside 'on') alternates decode steps with and without the CPU path once the copy-ahead trial has its verdict, and
    reports both medians; the greedy tokens are the copy path's whichever way each step ran."""
    runs = {}
    for mode in ("off", "on"):
        e = dsjax.load(store, dtype="float32", cpu_experts=mode, links=SLOW_LINK, **tight)
        try:
            e.policy.cpu_trial = mode == "on"
            runs[mode] = e.generate([PROMPTS[0]], max_new_tokens=40, stop_token_ids=())[0].token_ids
            stats = e.stats()["cpu_experts"]
        finally:
            e.close()
    assert runs["on"] == runs["off"]
    assert stats["experts"] > 0
    tr = stats["trial"]["1"]
    assert stats["trial_steps"]["with"] >= 3 and stats["trial_steps"]["without"] >= 3
    assert tr["ms_with"] > 0 and tr["ms_without"] > 0 and tr["cpu_wins"] in (True, False)


def test_the_config_keys_are_validated():
    with pytest.raises(RuntimeConfigError, match="cpu_experts"):
        RuntimeConfig.from_dict({}, cpu_experts="sometimes")
    with pytest.raises(RuntimeConfigError, match="cpu_threads"):
        RuntimeConfig.from_dict({}, cpu_threads=-1)
    with pytest.raises(RuntimeConfigError, match="cpu_experts"):
        RuntimeConfig.from_dict({"compute_config": {"cpu_experts": 3}})
    # YAML 1.1 reads on / off as booleans (a preset file, `--set cpu_experts=on`): they mean "on" / "off"
    assert RuntimeConfig.from_dict({"compute_config": {"cpu_experts": True}}).compute_config.cpu_experts == "on"
    assert RuntimeConfig.from_dict({}, cpu_experts=False).compute_config.cpu_experts == "off"
    c = RuntimeConfig.from_dict({}).compute_config
    assert (c.cpu_experts, c.cpu_threads) == ("auto", 0)


def test_the_planner_counts_the_cpu_path_at_batch_1():
    """Host-resident misses computed on the CPU beside the copies: both finish together, the link keeps the rest."""
    mb = ModelBytes(embed=10, head=10, layer_core=(100,) * 4, expert=10**6, n_experts=8, top_k=2, moe_layers=(1, 2, 3),
                    kv_bytes_per_token=1)
    links = Links(h2d=1e9, disk=1e9, hbm=1e15, sync_s=0.0, layer_call_s=0.0)
    kw = dict(max_gpu_layers=1, prefetch_layers=0, context_tokens=8)
    gpu = minimum_gpu_memory(mb, **kw)
    base = plan(mb, gpu, 10**9, links=links, **kw)
    assert base.gpu_expert_slots < 8 and base.host_experts == 8 and base.bound == "host->GPU"
    fast = plan(mb, gpu, 10**9, links=dataclasses.replace(links, cpu_rate=1e9), **kw)
    assert fast.cpu_bytes_per_token == pytest.approx(base.h2d_bytes_per_token / 2)      # equal rates: half each
    assert fast.t_cpu == pytest.approx(fast.t_h2d) and fast.tokens_per_s == pytest.approx(2 * base.tokens_per_s)
    assert "CPU computes" in fast.report(mb, dataclasses.replace(links, cpu_rate=1e9))
    # the CPU takes at most the host-resident misses: with a huge rate the link keeps only the streamed layer cores
    huge = plan(mb, gpu, 10**9, links=dataclasses.replace(links, cpu_rate=1e15), **kw)
    streamed = sum(c for i, c in enumerate(mb.layer_core) if i not in huge.resident_layers)
    assert huge.h2d_bytes_per_token == pytest.approx(streamed, abs=1e-5 * base.h2d_bytes_per_token)


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", [True, False], ids=["kernels", "references"])
def test_gpu_bf16_cpu_experts_give_the_tokens_of_the_copy_path(store, tight, fusion):
    """On the GPU in bf16: the CPU's rows (float32, rounded to bf16 on the GPU) against the FP4 kernels' or the
    references' rows, the host cache's pinned buffers read in place."""
    runs = {}
    for mode in ("off", "on"):
        e = dsjax.load(store, dtype="bfloat16", enable_fusion=fusion, cpu_experts=mode, links=SLOW_LINK, **tight)
        runs[mode] = [g.token_ids for g in e.generate(PROMPTS, max_new_tokens=8, stop_token_ids=())]
        experts = e.stats()["cpu_experts"]["experts"]
        e.close()
        assert (experts > 0) == (mode == "on")
    assert runs["on"] == runs["off"]

"""A GPU-resident hot set chosen from measured expert popularity (memory_config.hot_experts, issue 20 item 3): the
popularity file, the choice, the same tokens with fewer host->GPU bytes per decode token on a skewed workload, the
set pinned through evictions and failed steps, and the errors that name the fix.

Oracles: the tokens of the same engine without a hot set, the activation counts of stats(), numpy's own ordering of
the counts, the caches' slot tables.
"""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

import dsjax
from dsjax.runtime.config import RuntimeConfigError
from dsjax.runtime.expert_layout import ExpertLayout
from dsjax.runtime.planner import BudgetError, minimum_gpu_memory, minimum_host_memory
from dsjax.runtime.popularity import as_popularity, hot_set, read_popularity, write_popularity
from dsjax.runtime.tiered import model_bytes_from_store
from dsjax.store.reader import Store

PROMPTS = [np.random.default_rng(0).integers(2, 480, 24).tolist() for _ in range(4)]


@pytest.fixture(scope="module")
def skewed(demo_checkpoint, tmp_path_factory):
    """The demo model with a correction bias that favours a few experts of each MoE layer (V3's bias steers selection,
    not the weights): popularity as skewed as a real model's can be, where the demo's own is nearly flat."""
    from dsjax.config import ModelConfig
    from dsjax.model.weights import random_weights
    from dsjax.store.hf_write import hf_tensors, write_hf_checkpoint
    from dsjax.store.writer import convert
    with open(os.path.join(demo_checkpoint, "config.json")) as f:
        cfg_dict = json.load(f)
    cfg = ModelConfig.from_dict(cfg_dict)
    tensors = hf_tensors(cfg, random_weights(cfg, seed=0, dtype=np.float32))
    rng = np.random.default_rng(1)
    for i in range(cfg.num_hidden_layers):
        k = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
        if k in tensors:
            rank = rng.permutation(cfg.n_routed_experts)
            tensors[k] = (np.asarray(tensors[k], np.float32) + 0.5 * np.exp(-rank / 3.0)).astype(tensors[k].dtype)

    def tokenizer(d):
        for fn in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(demo_checkpoint, fn), os.path.join(d, fn))
    root = tmp_path_factory.mktemp("skewed")
    write_hf_checkpoint(str(root / "ckpt"), cfg_dict, tensors, extra_files=tokenizer)
    convert(str(root / "ckpt"), str(root / "store"), fmt="nvfp4", policy="mlp", progress=False)
    return str(root / "store")


def _budget(store, extra_slots=10, **over):
    """One streamed layer slot, a GPU expert pool of ~27 slots for 3 x 16 experts (LRFU evicts every step), every
    expert in the pinned host cache (no disk reads while decoding: the host->GPU bytes are deterministic)."""
    s = Store(store)
    mb = model_bytes_from_store(s, "float32")
    nb = ExpertLayout.of_store(s, 1).nbytes
    g = minimum_gpu_memory(mb, context_tokens=128, max_gpu_layers=1, prefetch_layers=1)
    return dict(dict(gpu_memory=g + 4 * nb * extra_slots, host_memory=100 * minimum_host_memory(mb), max_gpu_layers=1,
                     prefetch_layers=1, max_context=128, adaptive_schedule=False), **over)


def _run(store, n_tokens=48, **kw):
    e = dsjax.load(store, dtype="float32", **kw)
    tokens = [g.token_ids for g in e.generate(PROMPTS, max_new_tokens=n_tokens, stop_token_ids=())]
    return e, tokens


def _decode_h2d_per_token(e) -> float:
    s = e.stats()
    return s["phase_bytes"]["decode"]["host->GPU"] / s["steps"]["decode_rows"]


def _hot_keys(e):
    return [(i, x) for i, ex in e.hot.items() for x in ex]


def _on_gpu(e, keys):
    return [k for k in keys if e.experts.lookup(k, count=False) is not None]


def test_popularity_file_round_trip_and_the_choice(skewed, tmp_path):
    e, _ = _run(skewed, n_tokens=8, **_budget(skewed))
    doc = e.save_popularity(tmp_path / "pop.json")
    got = read_popularity(tmp_path / "pop.json")
    counts = np.asarray(e.stats()["expert_activations"])
    np.testing.assert_array_equal(got["activations"], counts)
    assert got["fingerprint"] == Store(skewed).manifest.source["fingerprint"] == doc["fingerprint"]
    assert counts[0].sum() == 0 and counts[1:].sum() == 3 * 4 * (4 * 24 + 4 * 7)   # dense layer 0; prompt + decode
    np.testing.assert_array_equal(as_popularity(str(tmp_path / "pop.json")), counts)
    for i in (1, 2, 3):                                  # the most counted, ties to the lower id
        want = sorted(sorted(range(16), key=lambda x: (-counts[i][x], x))[:3])
        assert hot_set(counts, [i], 16, 3) == {i: want}
    assert hot_set([[0] * 4, [5, 1, 9, 5]], [1], 4, 2) == {1: [0, 2]}
    assert hot_set([5, 9, 9, 0], [1], 4, 2) == {1: [1, 2]}       # one row for every layer
    with pytest.raises(ValueError, match="outside 0..4"):
        hot_set([1, 2, 3, 4], [1], 4, 5)


def test_hot_set_same_tokens_fewer_host_to_gpu_bytes_and_pinned_through_evictions(skewed, tmp_path):
    """A first run measures popularity on the workload; the hot set of the 3 most popular experts per MoE layer then
    gives its tokens with fewer host->GPU bytes per decode token at the same budget, and stays on the GPU while the
    LRFU pool evicts hundreds of times. overlap_io off: loads on demand isolate the cache (with copies ahead the
    saving depends on the predictions: see the numbers in the commit)."""
    kw = _budget(skewed, overlap_io=False)
    base, greedy = _run(skewed, **kw)
    base.save_popularity(tmp_path / "pop.json")
    counts = read_popularity(tmp_path / "pop.json")["activations"]
    e = dsjax.load(skewed, dtype="float32", hot_experts=3, popularity=str(tmp_path / "pop.json"), **kw)
    keys = _hot_keys(e)
    assert sorted(e.hot) == [1, 2, 3] and len(keys) == 9
    for i, ex in e.hot.items():
        assert ex == sorted(np.argsort(-counts[i], kind="stable")[:3].tolist())
    assert _on_gpu(e, keys) == keys                               # at load, before any token
    assert [g.token_ids for g in e.generate(PROMPTS, max_new_tokens=48, stop_token_ids=())] == greedy
    assert e.experts.slots.counters.evictions > 100              # the pool turned over many times around them
    assert _on_gpu(e, keys) == keys
    assert e.experts.slots.pinned_count() == len(keys)           # the per-step unpins left the hot pins alone
    h = e.stats()["hot_experts"]
    assert h["per_layer"] == 3 and h["experts"] == 9 and h["resident"] == 9 and h["loads"] == 1
    assert h["bytes"] == 9 * e.experts.expert_bytes and h["popularity"] == str(tmp_path / "pop.json")
    assert h["hits"] > 0 and 0 < h["assignment_share"] < 1
    with_hot, without = _decode_h2d_per_token(e), _decode_h2d_per_token(base)
    assert with_hot < 0.9 * without, f"host->GPU per decode token: {with_hot:.0f} B with the hot set, {without:.0f} B"
    # the same tokens with copies ahead and the adaptive schedule on, counts given in memory
    on = dict(kw, overlap_io=True, adaptive_schedule=True)
    e2 = dsjax.load(skewed, dtype="float32", hot_experts=3, popularity=counts, **on)
    assert [g.token_ids for g in e2.generate(PROMPTS, max_new_tokens=48, stop_token_ids=())] == greedy
    assert _on_gpu(e2, keys) == keys and e2.stats()["hot_experts"]["popularity"] == "counts given to dsjax.load"


def test_without_hot_experts_nothing_changes(store):
    """hot_experts=0 (the default) with no popularity: no hot set, the preload of the lowest expert ids as before."""
    e = dsjax.load(store, dtype="float32", **_budget(store))
    assert e.hot == {} and not e.experts.hot and e.experts.slots.pinned_count() == 0
    assert e.stats()["hot_experts"] == {"per_layer": 0, "popularity": None}
    per_gpu = e.preloaded["gpu"] // 3
    assert _on_gpu(e, [(i, x) for i in (1, 2, 3) for x in range(per_gpu)]) == [(i, x) for i in (1, 2, 3)
                                                                                  for x in range(per_gpu)]


def test_hot_experts_errors_name_the_fix(skewed, tmp_path):
    kw = _budget(skewed)
    with pytest.raises(RuntimeConfigError, match=r"hot_experts=2 .*needs measured popularity.*save_popularity"):
        dsjax.load(skewed, dtype="float32", hot_experts=2, **kw)
    counts = np.ones((4, 16))
    with pytest.raises(BudgetError, match=r"hot_experts=7 pins 21 GPU expert slots .* has 27, of which 8 must stay "
                                          r"free .* at most 6 hot experts per MoE layer .*raise gpu_memory"):
        dsjax.load(skewed, dtype="float32", hot_experts=7, popularity=counts, **kw)
    with pytest.raises(RuntimeConfigError, match="exceeds the 16 routed experts"):
        dsjax.load(skewed, dtype="float32", hot_experts=17, popularity=counts, **kw)
    with pytest.raises(RuntimeConfigError, match="hot_experts=-1 must be >= 0"):
        dsjax.load(skewed, dtype="float32", hot_experts=-1, **kw)
    write_popularity(tmp_path / "small.json", np.ones((2, 8)))
    with pytest.raises(ValueError, match="counts 2 layers x 8 experts; this model has 4 x 16"):
        dsjax.load(skewed, dtype="float32", hot_experts=2, popularity=str(tmp_path / "small.json"), **kw)
    write_popularity(tmp_path / "other.json", counts, model="elsewhere", fingerprint="not-this-one")
    with pytest.raises(ValueError, match="measured on another model"):
        dsjax.load(skewed, dtype="float32", hot_experts=2, popularity=str(tmp_path / "other.json"), **kw)
    with pytest.raises(FileNotFoundError, match="save_popularity"):
        dsjax.load(skewed, dtype="float32", hot_experts=2, popularity=str(tmp_path / "missing.json"), **kw)


def test_a_failed_step_keeps_the_hot_set_or_loads_it_again(skewed, monkeypatch):
    """A step that fails with the slot pool intact keeps the hot set pinned; one whose failure consumed the pool
    (a donating call) leaves an empty pool, and the next step loads the hot set again. Either way the next
    generation gives the tokens of an engine that never failed."""
    kw = _budget(skewed)
    _, want = _run(skewed, n_tokens=12, **kw)
    counts = np.arange(64).reshape(4, 16)[:, ::-1]                 # hot: experts 0, 1, 2 of every MoE layer
    e = dsjax.load(skewed, dtype="float32", hot_experts=3, popularity=counts, **kw)
    keys = _hot_keys(e)
    assert keys == [(i, x) for i in (1, 2, 3) for x in (0, 1, 2)]
    reals = {name: getattr(e.sched, name) for name in ("moe_rows", "moe_rows_out")}   # the calls that read the pool
    for consume in (False, True):
        calls = {"n": 0}

        def failing(real, pool, *a, consume=consume, calls=calls):
            calls["n"] += 1
            if calls["n"] == 5:                                  # mid-generation, mid-step
                if consume:                                      # as a failed donating call leaves it
                    for leaf in jax.tree.leaves(pool):
                        leaf.delete()
                raise RuntimeError("injected failure")
            return real(pool, *a)
        for name, real in reals.items():
            monkeypatch.setattr(e.sched, name, functools.partial(failing, real))
        with pytest.raises(RuntimeError, match="injected failure"):
            e.generate(PROMPTS, max_new_tokens=12, stop_token_ids=())
        for name, real in reals.items():
            monkeypatch.setattr(e.sched, name, real)
        loads = e.stats()["hot_experts"]["loads"]
        if consume:
            assert loads == 1 and _on_gpu(e, keys) == []           # the pool went, and the hot set with it
        else:
            assert loads == 1 and _on_gpu(e, keys) == keys and e.experts.slots.pinned_count() == len(keys)
        assert [g.token_ids for g in e.generate(PROMPTS, max_new_tokens=12, stop_token_ids=())] == want
        assert _on_gpu(e, keys) == keys and e.experts.slots.pinned_count() == len(keys)
        assert e.stats()["hot_experts"]["loads"] == (2 if consume else 1)


def test_layers_whose_experts_exceed_the_free_slots_come_in_chunks_around_the_hot_set(skewed):
    """Prefill of 4 prompts routes to every expert of a layer: 14 beside the 2 hot ones, and 15 slots of which 6 are
    hot leave 9; the others come in chunks of the free slots (not of all slots: that would pin more than there are)."""
    kw = _budget(skewed, extra_slots=8)
    _, want = _run(skewed, n_tokens=4, **kw)
    e, got = _run(skewed, n_tokens=4, hot_experts=2, popularity=np.ones((4, 16)), **kw)
    assert e.experts.slots.capacity == 15 and got == want


def test_copies_issued_before_a_failed_step_are_written_or_forgotten(store, monkeypatch):
    """A step that fails between copies ahead (issued for the next MoE layer) and the write that lands them must not
    leave slots naming experts they do not hold: the next generation gives the tokens of an engine that never
    failed."""
    kw = _budget(store, overlap_io=True, expert_threshold=0.0)       # every predicted expert is copied ahead
    short = PROMPTS[0][:3]                  # few experts per layer: the slots of the failed step's copies stay
    want = dsjax.load(store, dtype="float32", **kw).generate(short, max_new_tokens=12, stop_token_ids=()).token_ids
    e = dsjax.load(store, dtype="float32", **kw)
    real, calls = e._ensure, {"n": 0}

    def failing(i, experts, mv=None):
        if e.experts._pending:                           # copies ahead in flight, not yet written
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure")
        return real(i, experts, mv)
    monkeypatch.setattr(e, "_ensure", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        e.generate(PROMPTS, max_new_tokens=12, stop_token_ids=())
    assert calls["n"] == 3
    monkeypatch.setattr(e, "_ensure", real)
    assert e.generate(short, max_new_tokens=12, stop_token_ids=()).token_ids == want


def test_popularity_orders_the_preload(skewed):
    """With popularity and no hot set, preload_experts fills the GPU slots with each layer's most popular experts
    (not the lowest ids); the tokens stay the same."""
    kw = _budget(skewed)
    _, want = _run(skewed, n_tokens=6, **kw)
    counts = np.tile(np.arange(16), (4, 1))                     # experts 15, 14, ... first
    e = dsjax.load(skewed, dtype="float32", popularity=counts, **kw)
    per_gpu = e.preloaded["gpu"] // 3
    assert 0 < per_gpu < 16 and e.hot == {}
    top = [(i, x) for i in (1, 2, 3) for x in range(15, 15 - per_gpu, -1)]
    assert _on_gpu(e, top) == top and not _on_gpu(e, [(i, 0) for i in (1, 2, 3)])
    assert [g.token_ids for g in e.generate(PROMPTS, max_new_tokens=6, stop_token_ids=())] == want


def test_cli_saves_popularity_and_loads_a_hot_set(store, tmp_path, capsys):
    """dsjax generate --save-popularity PATH, then --set hot_experts=N --set popularity=PATH: the same text; without
    popularity the error names the fix (exit 2)."""
    from dsjax.cli import main
    kw = _budget(store)
    args = ["generate", store, "--prompt", "Thou art", "--max-new-tokens", "6", "--dtype", "float32", "--json",
            "--temperature", "0", "--gpu-memory", str(kw["gpu_memory"]), "--host-memory", str(kw["host_memory"]),
            "--set", "max_gpu_layers=1", "--set", "prefetch_layers=1", "--set", "max_context=128"]
    pop = str(tmp_path / "pop.json")
    assert main(args + ["--save-popularity", pop]) == 0
    out = capsys.readouterr()
    assert f"written to {pop}" in out.err
    counts = read_popularity(pop)["activations"]
    assert counts[1:].sum() == 3 * 4 * (len(json.loads(out.out)["prompt_ids"]) + 5)
    assert main(args + ["--set", "hot_experts=2", "--set", f"popularity={pop}"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == json.loads(out.out)["token_ids"]
    assert main(args + ["--set", "hot_experts=2"]) == 2
    assert "needs measured popularity" in capsys.readouterr().err

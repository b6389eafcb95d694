"""Expert parallelism over a mesh (issue 22, all-in-HBM slice): the partition of experts over devices, and the engine on
2 and 4 CPU devices giving the tokens and logits of the single-device engine (dsjax.load(store, in_memory=True), the
1-device case) bit for bit.

The multi-device checks run in a child process: XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before
JAX starts its CPU client, and this pytest process may already have started it. The child prints one JSON line of
findings; the assertions (and their messages) are here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsjax.runtime.parallel import ExpertShards, partition_experts

# ---- the partition (plain numpy) ----------------------------------------------------------------------------------


def _check_partition(parts, E, n):
    ids = np.concatenate(parts)
    assert len(parts) == n and sorted(ids.tolist()) == list(range(E)), f"not a partition of {E} experts: {parts}"
    assert all(np.all(np.diff(p) > 0) for p in parts), "each device's ids are sorted and distinct"


@pytest.mark.parametrize("E,n", [(16, 1), (16, 2), (16, 4), (256, 8), (10, 4), (3, 4)])
def test_without_popularity_the_partition_is_e_mod_n(E, n):
    parts = partition_experts(None, [1000] * E, n)
    _check_partition(parts, E, n)
    for d, p in enumerate(parts):
        assert p.tolist() == list(range(d, E, n)), f"device {d}: {p.tolist()}"
    counts = [len(p) for p in parts]
    assert max(counts) - min(counts) <= 1 and max(counts) == -(-E // n)


def test_popularity_spreads_hot_experts_that_e_mod_n_would_stack():
    """Every 4th expert hot (ids 0, 4, 8, ...): e % 4 puts all of them on device 0; the greedy spreads them, within
    equal counts (bytes) per device."""
    E, n = 64, 4
    rng = np.random.default_rng(0)
    pop = rng.uniform(1, 2, E)
    pop[::n] *= 50
    parts = partition_experts(pop, [7] * E, n)
    _check_partition(parts, E, n)
    assert {len(p) for p in parts} == {E // n}, "equal bytes: equal counts"
    load = np.array([pop[p].sum() for p in parts])
    naive = np.array([pop[d::n].sum() for d in range(n)])
    assert load.max() / load.mean() < 1.02, f"max/mean popularity per device {load.max() / load.mean():.4f}"
    assert naive.max() / naive.mean() > 3, "the case is one e % n handles badly"


def test_zipf_popularity_is_balanced_to_within_the_hottest_expert():
    E, n = 256, 8
    pop = 1.0 / np.arange(1, E + 1) ** 1.1
    np.random.default_rng(1).shuffle(pop)
    parts = partition_experts(pop, [24_772_620] * E, n)
    _check_partition(parts, E, n)
    load = np.array([pop[p].sum() for p in parts])
    assert {len(p) for p in parts} == {E // n}
    assert load.max() - load.min() <= pop.max() + 1e-12, f"loads {load}, hottest expert {pop.max()}"


def test_unequal_bytes_are_balanced_within_one_expert():
    E, n = 40, 4
    b = np.random.default_rng(2).integers(100, 1000, E)
    parts = partition_experts(None, b, n)
    _check_partition(parts, E, n)
    held = np.array([b[p].sum() for p in parts])
    assert held.max() <= b.sum() / n + b.max(), f"bytes per device {held}, fair share {b.sum() / n}"
    pop = np.random.default_rng(3).uniform(0, 1, E)
    parts = partition_experts(pop, b, n)
    _check_partition(parts, E, n)
    assert max(b[p].sum() for p in parts) <= b.sum() / n + b.max()


def test_partition_rejects_bad_input():
    with pytest.raises(ValueError, match="number of experts"):
        partition_experts(None, 1000, 4)
    with pytest.raises(ValueError, match=">= 1"):
        partition_experts(None, [1] * 8, 0)
    with pytest.raises(ValueError, match=r"\[E\]"):
        partition_experts(np.ones(8), [1] * 7, 2)
    with pytest.raises(ValueError, match="exactly once"):
        ExpertShards.from_partition([np.array([0, 1]), np.array([1, 2])], 4)


def test_slot_table_maps_each_expert_to_its_device_and_slot():
    parts = [np.array([0, 3, 5]), np.array([1, 2]), np.array([4, 6, 7])]
    sh = ExpertShards.from_partition(parts, 8)
    assert sh.size == 3
    table = sh.slots()
    for d, ids in enumerate(parts):
        assert table[d, ids].tolist() == list(range(len(ids)))
        others = np.setdiff1d(np.arange(8), ids)
        assert (table[d, others] == sh.size).all(), "experts held elsewhere map to the padding sentinel S"


# ---- the engine on 1, 2 and 4 CPU devices (child process) ---------------------------------------------------------

CHILD = r"""
import json, sys
import numpy as np, jax
import dsjax
from dsjax.runtime.parallel import as_mesh, load_parallel

store, ckpt = sys.argv[1], sys.argv[2]
out = {"devices": jax.device_count()}
prompts = ["To be, or not to be", "Once upon a time there", "The king", [5, 6, 7, 8, 9, 10, 11, 12, 13]]
probe = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]


def greedy_ids(engine, n=10):
    return [x.token_ids for x in engine.generate(prompts, max_new_tokens=n)]


def run(engine):
    s = engine.generate(prompts, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    return greedy_ids(engine), [x.token_ids for x in s], engine.logits(probe)


ref = dsjax.load(store, in_memory=True)
ref_greedy, ref_sampled, logits = run(ref)
out["ref"] = {"greedy": ref_greedy, "sampled": ref_sampled, "acts": ref.stats()["expert_activations"]}
ref_layers = ref.weights["layers"]
for n in (2, 4):
    e = dsjax.load(store, devices=n) if n == 2 else load_parallel(store, n)      # the public entry and the direct one
    g, s, lg = run(e)
    st = e.stats()
    r = out[n] = {"greedy": g, "sampled": s, "logits_max_abs": float(np.abs(lg - logits).max()),
                  "devices": st["parallel"]["devices"], "acts": st["expert_activations"],
                  "per_device": st["parallel"]["per_device"], "total": st["parallel"]["total"]}
    # what each device holds: its share of every MoE layer's experts, equal to the reference's rows, padding zeros
    held, same = [], True
    for i, sh in e.shards.items():
        w, wr = e.weights["layers"][i], ref_layers[i]
        for k in ("experts_gate", "experts_up", "experts_down"):
            for field in ("packed", "scales", "global_scale"):
                whole = np.asarray(getattr(wr[k], field))
                for shard in getattr(w[k], field).addressable_shards:
                    d = list(e.mesh.devices.flat).index(shard.device)
                    ids = sh.experts[d]
                    block = np.asarray(shard.data)
                    same &= block.shape[0] == sh.size and np.array_equal(block[:len(ids)], whole[ids])
                    same &= not block[len(ids):].any()
        held.append([sorted(x.tolist()) for x in sh.experts])
    r["held"], r["data_matches"] = held, bool(same)
    e.close()

# balanced by measured popularity (a skewed table): a different split, the same tokens
pop = np.ones((ref.config.num_hidden_layers, ref.config.n_routed_experts))
pop[:, ::4] = 40.0
e = load_parallel(store, 4, popularity=pop)
out["popular"] = {"greedy": greedy_ids(e), "held": [sh.experts[0].tolist() for sh in e.shards.values()]}
e.close()
e = load_parallel(store, 4, exact_combine=False)
out["inexact_logits_max_abs"] = float(np.abs(e.logits(probe) - logits).max())
e.close()

# a Hugging Face checkpoint (float32, experts plain arrays) over 2 devices against dsjax.load
hf = dsjax.load(ckpt, dtype="float32")
e = load_parallel(ckpt, 2, dtype="float32")
out["hf"] = {"ref": greedy_ids(hf, 6), "ep": greedy_ids(e, 6),
             "logits_max_abs": float(np.abs(hf.logits(probe) - e.logits(probe)).max())}
e.close()

errors = []
for bad in (5, jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))):
    try:
        as_mesh(bad)
    except ValueError as err:
        errors.append(str(err))
out["errors"] = errors
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def four_devices(store, demo_checkpoint):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip())
    r = subprocess.run([sys.executable, "-c", CHILD, store, demo_checkpoint], env=env, capture_output=True, check=False,
                       text=True, timeout=300)
    assert r.returncode == 0, f"child failed:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n", [2, 4])
def test_tokens_and_logits_equal_the_single_device_engine(four_devices, n):
    """The single-device engine (dsjax.load(store, in_memory=True)) is the 1-device reference."""
    got, ref = four_devices[str(n)], four_devices["ref"]
    assert four_devices["devices"] == 4 and got["devices"] == n
    assert got["greedy"] == ref["greedy"], f"{n} devices: greedy tokens differ"
    assert got["sampled"] == ref["sampled"], f"{n} devices: sampled tokens (seed 7) differ"
    assert got["logits_max_abs"] == 0.0, f"{n} devices: logits differ, max abs {got['logits_max_abs']}"


@pytest.mark.parametrize("n", [2, 4])
def test_each_device_holds_a_disjoint_share_of_the_experts(four_devices, n):
    got = four_devices[str(n)]
    for layer in got["held"]:
        assert len(layer) == n
        flat = [e for share in layer for e in share]
        assert sorted(flat) == list(range(16)) and len(set(flat)) == len(flat), f"not a partition: {layer}"
        assert {len(share) for share in layer} == {16 // n}
    assert got["data_matches"], "a device's expert block is not the reference's rows of its experts (+ zero padding)"


@pytest.mark.parametrize("n", [2, 4])
def test_stats_per_device_count_each_devices_experts_and_assignments(four_devices, n):
    """The same workload as the single-device engine: the same expert activations; each device's assignments are
    those of the experts it holds, and they add up to all of them."""
    got, ref = four_devices[str(n)], four_devices["ref"]
    assert got["acts"] == ref["acts"], "routed token-expert pairs per layer differ from the single-device engine's"
    per, held = got["per_device"], got["held"]         # held: per MoE layer, per device, its experts
    moe = [i for i, row in enumerate(ref["acts"]) if any(row)]
    assert len(per) == n and len(moe) == len(held)
    for d in range(n):
        want = sum(ref["acts"][i][e] for i, layer in zip(moe, held) for e in layer[d])
        assert per[d]["assignments"] == want, f"device {d}: {per[d]['assignments']} assignments, expected {want}"
        assert per[d]["experts"] == sum(len(layer[d]) for layer in held)
        assert per[d]["weight_bytes"] > per[d]["expert_bytes"] > 0
    assert got["total"]["assignments"] == sum(map(sum, ref["acts"])) > 0
    assert got["total"]["experts"] == 16 * len(held)


def test_popularity_changes_the_split_not_the_tokens(four_devices):
    pop = four_devices["popular"]
    assert pop["greedy"] == four_devices["ref"]["greedy"]
    assert all(sum(e % 4 == 0 for e in share) == 1 for share in pop["held"]), \
        f"each device should hold one of the hot experts 0, 4, 8, 12: {pop['held']}"


def test_inexact_combine_is_close(four_devices):
    err = four_devices["inexact_logits_max_abs"]
    assert err < 0.1, f"float32 partial sums psum'ed: logits max abs {err} (bf16 model, logits of order 10)"


def test_hugging_face_checkpoint_over_two_devices(four_devices):
    hf = four_devices["hf"]
    assert hf["ep"] == hf["ref"] and hf["logits_max_abs"] == 0.0, f"max abs {hf['logits_max_abs']}"


def test_mesh_errors_say_what_to_do(four_devices):
    too_many, no_axis = four_devices["errors"]
    assert "sees 4 device" in too_many
    assert "'expert' axis" in no_axis


# ---- planning several devices (pure) ------------------------------------------------------------------------------

def _v3():
    from dsjax.runtime.plan_devices import v3_model_bytes
    return v3_model_bytes()


@pytest.mark.parametrize("gpu,host", [("16GB", "96GB"), ("80GB", "96GB"), ("24GB", "64GB")])
def test_one_device_plan_is_the_single_gpu_planners(gpu, host):
    from dsjax.runtime.plan_devices import plan_devices
    from dsjax.runtime.planner import plan
    mb = _v3()
    one, ref = plan_devices(mb, 1, gpu, host), plan(mb, gpu, host)
    d = one.devices[0]
    assert one.mode == "tiered" and d.placement == ref
    assert d.h2d_bytes == pytest.approx(ref.h2d_bytes_per_token) and one.disk_bytes == pytest.approx(
        ref.disk_bytes_per_token) and d.hbm_bytes == pytest.approx(ref.hbm_bytes_per_token)
    assert one.tokens_per_s == pytest.approx(ref.tokens_per_s), f"{one.tokens_per_s} vs {ref.tokens_per_s}"


def test_eight_80gb_gpus_hold_all_of_v3_in_hbm():
    from dsjax.runtime.plan_devices import device_weight_bytes, fits_all_in_hbm, plan_devices
    mb = _v3()
    p = plan_devices(mb, 8, "80GB", "96GB")
    core = mb.embed + mb.head + sum(mb.layer_core)
    experts = mb.expert * mb.n_experts * len(mb.moe_layers)
    assert device_weight_bytes(mb, 8) == core + experts // 8 and 74e9 < device_weight_bytes(mb, 8) < 76e9
    assert p.mode == "all in HBM" and fits_all_in_hbm(mb, 8, "80GB")
    assert all(d.resident and d.h2d_bytes == 0 and d.kv_tokens >= 4096 for d in p.devices) and p.disk_bytes == 0
    assert not fits_all_in_hbm(mb, 4, "80GB") and plan_devices(mb, 4, "80GB", "96GB").mode == "tiered"
    assert p.tokens_per_s > 5 * plan_devices(mb, 1, "80GB", "96GB").tokens_per_s


def test_more_gpus_never_plan_slower_and_share_the_disk():
    from dsjax.runtime.plan_devices import plan_devices
    mb = _v3()
    prev = None
    for n in (1, 2, 4, 8):
        for batch in (1, 32):
            p = plan_devices(mb, n, "16GB", "96GB", batch=batch)
            assert p.disk_bytes == pytest.approx(sum(d.disk_bytes for d in p.devices))
            assert p.t_disk == pytest.approx(p.disk_bytes / 12e9) and p.t_h2d == max(d.t_h2d for d in p.devices)
            if batch == 1:
                assert prev is None or p.tokens_per_s >= prev.tokens_per_s, f"{n} GPUs slower than {n // 2}"
                prev = p
    assert prev.disk_bytes == 0, "8 host caches of 96 GB hold every expert"


def test_budgets_per_device_and_expected_experts():
    from dsjax.runtime.plan_devices import expected_experts, plan_devices
    mb = _v3()
    p = plan_devices(mb, 2, ["16GB", "24GB"], "96GB")
    assert p.devices[0].gpu_memory == 16e9 and p.devices[1].gpu_memory == 24e9
    assert p.devices[1].gpu_experts >= p.devices[0].gpu_experts and p.t_h2d == p.devices[0].t_h2d
    with pytest.raises(ValueError, match="3 budgets for 2 devices"):
        plan_devices(mb, 2, ["16GB"] * 3, "96GB")
    assert expected_experts(256, 8, 1) == 8
    assert 8 < expected_experts(256, 8, 8) < 64 and 250 < expected_experts(256, 8, 1024) <= 256


def test_the_built_tiered_layout_keeps_the_layers_on_the_first_gpu():
    """core="first" (what tiered.TieredEngine with devices= runs): GPU 0 plans as one GPU holding the layers and its
    share of the experts; every other GPU holds experts only, with its layer pools given to expert slots, so it keeps
    more of its share on the GPU than GPU 0 and moves fewer bytes per step; one GPU is the single-GPU plan; all of V3
    in HBM over 8 x 80 GB plans the replicated layout that runs there."""
    from dsjax.runtime.plan_devices import plan_devices
    from dsjax.runtime.planner import Pools, plan
    mb = _v3()
    one = plan_devices(mb, 1, "16GB", "96GB", core="first")
    assert one.tokens_per_s == pytest.approx(plan(mb, "16GB", "96GB").tokens_per_s)
    for n in (2, 4, 8):
        p = plan_devices(mb, n, "16GB", "96GB", core="first")
        d0, rest = p.devices[0], p.devices[1:]
        assert p.mode == "tiered" and p.core == "first"
        E_d, moe = -(-mb.n_experts // n), len(mb.moe_layers)
        pools = Pools.split(16 * 10**9, 96 * 10**9)
        slots = min(E_d, (pools.expert_cache + pools.active_layers) // (mb.expert * moe))
        for d in rest:
            assert d.weight_bytes == d.expert_bytes == E_d * moe * mb.expert and d.kv_tokens == 0
            assert d.gpu_experts == slots > d0.gpu_experts and d.h2d_bytes < d0.h2d_bytes
        assert d0.weight_bytes == mb.embed + mb.head + sum(mb.layer_core) + E_d * moe * mb.expert
        assert p.tokens_per_s > one.tokens_per_s
    assert plan_devices(mb, 8, "80GB", "96GB", core="first").core == "replicated"

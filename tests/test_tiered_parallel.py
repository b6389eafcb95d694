"""Tiered expert parallelism (issue 22): dsjax.load(store, devices=N, gpu_memory=..., host_memory=...) gives each device
its own GPU expert slots, its own pinned host cache and its own host->GPU copies for the experts it owns, under budgets
that force the host and disk tiers. The reference is the one-device tiered engine under the same budget (itself equal
to transformers: test_vs_hf.py, and to the all-in-HBM engine: test_runtime.py).

The checks run in a child process with XLA_FLAGS=--xla_force_host_platform_device_count=4 (set before JAX starts its
CPU client); the child prints one JSON line of findings and the assertions are here.
"""

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys
import numpy as np, jax
import dsjax
from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
from dsjax.runtime.tiered import model_bytes_from_store
from dsjax.store.reader import Store

store = sys.argv[1]
PROMPTS = [[0, 17, 42, 99, 7, 3, 250, 11, 80, 5, 6, 120], [0, 5, 6]]
mb = model_bytes_from_store(Store(store))
tight = dict(max_gpu_layers=1, prefetch_layers=1)
g = minimum_gpu_memory(mb, context_tokens=512, **tight)
h = minimum_host_memory(mb)
budgets = {"tight": dict(gpu_memory=g, host_memory=2 * h, **tight),   # GPU slots < experts, host cache < experts
           "minimal": dict(gpu_memory=g, host_memory=h, **tight),
           # measured popularity: it orders each device's share and the preload; each device pins its hot share
           "hot": dict(gpu_memory=g, host_memory=2 * h, hot_experts=1,
                       popularity=np.tile(np.arange(16)[::-1], (Store(store).config.num_hidden_layers, 1)), **tight)}
out = {"devices": jax.device_count(), "runs": {}}

def link(stats, name):
    return stats["links"].get(name, {}).get("bytes", 0)

def run(engine):
    greedy = [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=10, stop_token_ids=())]
    sampled = engine.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=7, stop_token_ids=()).token_ids
    logits = np.asarray(engine.logits(PROMPTS[0]), np.float64)
    return greedy, sampled, logits

for name, kw in budgets.items():
    ref = dsjax.load(store, dtype="float32", **kw)
    greedy, sampled, logits = run(ref)
    ref_stats = ref.stats()
    ref.close()
    res = {"ref": {"greedy": greedy, "sampled": sampled,
                   "disk_bytes": link(ref_stats, "disk->host")}}
    for n in (2, 4):
        e = dsjax.load(store, dtype="float32", devices=n, **kw)
        g2, s2, l2 = run(e)
        st = e.stats()
        E = e.config.n_routed_experts
        # which device's caches hold which experts: each only its own
        foreign = 0
        held = []
        for i in e.moe_layers:
            row = []
            for d, mv in enumerate(e.movers):
                own = e.owner[i] == d
                foreign += int((mv.experts.resident(i, E) & ~own).sum() + (mv.host_cache.resident(i, E) & ~own).sum())
                row.append(np.flatnonzero(own).tolist())
            held.append(row)
        devs = st["expert_devices"]
        res[str(n)] = {"greedy": g2, "sampled": s2, "logits_max_abs": float(np.abs(l2 - logits).max()),
                       "foreign": foreign, "held": held, "count": devs["count"],
                       "expert_bytes": e.experts.expert_bytes,
                       "per_device": [{"device": p["device"], "experts": p["experts"], "gpu_slots": p["gpu_slots"],
                                       "h2d": p["bytes"].get("host->GPU", 0), "staged": p["bytes"].get("stage->pinned", 0),
                                       "gpu_misses": p["gpu_misses"]} for p in devs["per_device"]],
                       "h2d_total": link(st, "host->GPU"), "disk_bytes": link(st, "disk->host")}
        e.close()
    out["runs"][name] = res
try:                                   # the CPU experts' path serves one device's host cache
    dsjax.load(store, dtype="float32", devices=2, cpu_experts="on", **budgets["tight"])
except ValueError as err:
    out["cpu_on_error"] = str(err)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def four_devices(store):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip())
    r = subprocess.run([sys.executable, "-c", CHILD, store], env=env, capture_output=True, check=False, text=True,
                       timeout=900)
    assert r.returncode == 0, f"child failed:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


BUDGETS = ["tight", "minimal", "hot"]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("n", [2, 4])
def test_tokens_equal_one_device_under_budgets_that_force_host_and_disk(four_devices, budget, n):
    run = four_devices["runs"][budget]
    got, ref = run[str(n)], run["ref"]
    assert four_devices["devices"] == 4
    assert ref["disk_bytes"] > 0 and got["disk_bytes"] > 0, "the budget must leave experts on disk"
    assert got["greedy"] == ref["greedy"], f"{n} devices, {budget}: greedy tokens differ"
    assert got["sampled"] == ref["sampled"], f"{n} devices, {budget}: sampled tokens (seed 7) differ"
    assert got["logits_max_abs"] < 1e-5, f"{n} devices, {budget}: logits differ by {got['logits_max_abs']}"


@pytest.mark.parametrize("n", [2, 4])
def test_each_device_holds_and_copies_only_its_own_disjoint_share(four_devices, n):
    got = four_devices["runs"]["tight"][str(n)]
    assert got["count"] == n and len(got["per_device"]) == n
    assert len({p["device"] for p in got["per_device"]}) == n, "one set of movers per distinct device"
    for layer in got["held"]:
        flat = [e for share in layer for e in share]
        assert sorted(flat) == list(range(len(flat))) and len(flat) == 16, f"not a partition: {layer}"
        assert {len(s) for s in layer} == {16 // n}, f"unequal shares: {layer}"
    assert got["foreign"] == 0, "a device's GPU slots or host cache hold an expert another device owns"
    per = got["per_device"]
    assert sum(p["experts"] for p in per) == 16 * len(got["held"])
    # every device staged and copied experts over its own link (a device whose slots hold all it owns copies them
    # once, at the preload; the others miss and copy during the steps); the devices' bytes add up to the engine's total
    for p in per:
        assert p["h2d"] > 0 and p["staged"] > 0, f"device {p}"
        assert (p["gpu_misses"] > 0) == (p["gpu_slots"] < p["experts"]), f"device {p}"
    assert per[0]["gpu_slots"] < per[0]["experts"], "the first device's budget must stream its experts"
    # whole expert buffers only; the engine's host->GPU total also counts the streamed layer cores
    assert all(p["h2d"] % got["expert_bytes"] == 0 for p in per), (per, got["expert_bytes"])
    assert sum(p["h2d"] for p in per) < got["h2d_total"]


def test_bad_device_requests_say_what_to_do(four_devices, store):
    assert "cpu_experts='on' with several devices" in four_devices["cpu_on_error"]
    assert "set cpu_experts to auto or off" in four_devices["cpu_on_error"]
    import jax

    import dsjax
    d = jax.devices()[0]
    with pytest.raises(ValueError, match="distinct jax devices"):
        dsjax.load(store, devices=[d, d], gpu_memory="1MB")

"""The Planner: budget parsing, placement decisions and the bytes-per-token arithmetic behind the predicted speed."""

import re

import pytest

from dsjax.config import ModelConfig
from dsjax.runtime.planner import BudgetError, Links, ModelBytes, parse_bytes, plan
from test_config import MODELS


@pytest.mark.parametrize("text,value", [("512MB", 512 * 10**6), ("16GB", 16 * 10**9), ("16GiB", 16 * 2**30),
                                         ("1.5 GB", 1_500_000_000), (4096, 4096), ("100", 100), ("2kib", 2048)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["16 parsecs", "GB", "-1GB", -5, True, "1e3GB"])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError, match="gpu_memory"):
        parse_bytes(bad, "gpu_memory")


def test_v3_byte_counts_match_the_format_arithmetic():
    """One NVFP4 V3 expert: 3 matrices of 2048x7168, 4 bits per weight + one E4M3 scale per 16 + FP32 per matrix."""
    cfg = ModelConfig.from_dict(MODELS["v3"])
    mb = ModelBytes.from_config(cfg, "nvfp4", "mlp")
    assert mb.expert == 3 * (2048 * 7168 // 2 + 2048 * 7168 // 16 + 4)  # 24.77 MB (reference/hardware.md: 24.8 MB)
    assert len(mb.moe_layers) == 58 and mb.top_k == 8
    per_token = len(mb.moe_layers) * mb.top_k * mb.expert
    assert 11.4e9 < per_token < 11.6e9  # DESIGN.md §1: ~11.5 GB of routed-expert bytes per token
    mx = ModelBytes.from_config(cfg, "mxfp4", "mlp")
    assert mx.expert == 3 * (2048 * 7168 // 2 + 2048 * 7168 // 32 + 4)
    # attention in bf16 (mlp policy) vs FP4 (all): DESIGN/issue figures 22.8 GB vs 6.4 GB (+ norms, routers, shared)
    attn_keys = ModelBytes.from_config(cfg, "nvfp4", "mlp").layer_core[5] - ModelBytes.from_config(
        cfg, "nvfp4", "all").layer_core[5]
    assert attn_keys > 0


def _toy(n_layers=4, core=100, expert=10, E=8, K=2, head=50, embed=40, kv=1):
    return ModelBytes(embed=embed, head=head, layer_core=(core,) * n_layers, expert=expert, n_experts=E, top_k=K,
                      moe_layers=tuple(range(1, n_layers)), kv_bytes_per_token=kv)


def test_bytes_per_token_by_hand():
    mb = _toy()
    # GPU 1600: active 800 = head 50 + ring 1x100 + 6 resident-capable -> all 4 resident (400); expert pool 400:
    # staging K*(1+1)*10 = 40, slots = (400-40) // (10*3) = 12 -> capped at E=8: everything on the GPU.
    p = plan(mb, 1600, 9600, max_gpu_layers=1, prefetch_layers=1, context_tokens=1)
    assert p.resident_layers == (0, 1, 2, 3) and p.ring_slots == 0 and p.gpu_expert_slots == 8
    assert p.h2d_bytes_per_token == 0 and p.disk_bytes_per_token == 0 and p.bound == "GPU compute"
    # GPU 480: active 240 = head 50 + 1 ring slot 100 -> 90 left: no layer resident; expert pool 120: slots 2 of 8.
    p = plan(mb, 480, 9600, max_gpu_layers=1, prefetch_layers=1, context_tokens=1)
    assert p.resident_layers == () and p.ring_slots == 1 and p.gpu_expert_slots == 2
    expect_h2d = 4 * 100 + 3 * 2 * (1 - 2 / 8) * 10   # all cores stream; 3 MoE layers x K=2 x miss 6/8 x 10 B
    assert p.h2d_bytes_per_token == pytest.approx(expect_h2d)
    assert p.host_experts == 8 and p.disk_bytes_per_token == 0   # host 9600 holds everything


def test_pinned_host_bytes_by_hand():
    mb = _toy()
    # GPU 480 (as above): no layer resident, 2 of 8 expert slots; host 9600 holds every expert and layer core
    p = plan(mb, 480, 9600, max_gpu_layers=1, prefetch_layers=1, context_tokens=1)
    assert p.host_experts == 8 and p.host_layers == (0, 1, 2, 3)
    assert p.pinned_host_bytes(mb) == 40 + 4 * 100 + 8 * 3 * 10          # embed + cores + 8 experts x 3 MoE layers
    assert p.pinned_host_bytes(mb, devices=2) == p.pinned_host_bytes(mb)  # each expert once over the devices
    assert "pinned by this plan 680 B" in p.report(mb, Links())
    # every expert on the host: nothing read from disk after the preload, so the peak is the caches; the cap adds
    # 10% and 2 GiB, in whole GiB
    assert p.pinned_host_peak(mb) == 680 and "at most 680 B with disk reads in flight" in p.report(mb, Links())
    assert "caps JAX's pinned pool at 3 GiB" in p.report(mb, Links())
    # everything on the GPU: no host expert cache, no host cores; the embedding stays on the host
    p = plan(mb, 1600, 9600, max_gpu_layers=1, prefetch_layers=1, context_tokens=1)
    assert p.pinned_host_bytes(mb) == 40


def test_more_memory_never_plans_slower():
    cfg = ModelConfig.from_dict(MODELS["v3"])
    mb = ModelBytes.from_config(cfg, "nvfp4", "mlp")
    prev = None
    for gpu, host in [("16GB", "64GB"), ("24GB", "96GB"), ("48GB", "128GB"), ("141GB", "512GB"), ("1TB", "1TB")]:
        p = plan(mb, gpu, host)
        if prev is not None:
            assert p.t_token <= prev.t_token + 1e-12
            assert len(p.resident_layers) >= len(prev.resident_layers)
            assert p.gpu_expert_slots >= prev.gpu_expert_slots and p.host_experts >= prev.host_experts
        prev = p
    assert prev.gpu_expert_slots == 256 and prev.h2d_bytes_per_token == 0 and prev.disk_bytes_per_token == 0


def test_v3_on_the_target_box_is_disk_bound():
    """16 GB GPU + 96 GB host: most experts live on disk only, so the NVMe link sets the speed (peers.md §3)."""
    mb = ModelBytes.from_config(ModelConfig.from_dict(MODELS["v3"]), "nvfp4", "mlp")
    p = plan(mb, "16GB", "96GB", links=Links(h2d=50e9, disk=12e9))
    assert p.bound == "disk->host"
    assert p.t_token == pytest.approx(p.disk_bytes_per_token / 12e9)
    assert 0.5 < p.tokens_per_s < 5
    links = Links(h2d=50e9, disk=12e9)
    slow = plan(mb, "16GB", "96GB", links=links, overlap_io=False)
    # loading on demand sums the links and the GPU's work; a streamed MoE layer's copies are issued while the link
    # moves them, so its host term is the routing read-back alone, not the prefetching engine's sync + copies
    moe, n = len(mb.moe_layers), len(mb.layer_core)
    assert slow.t_compute == pytest.approx(slow.hbm_bytes_per_token / links.hbm
                                           + moe * links.readback_s + n * links.layer_call_s)
    assert slow.t_token == pytest.approx(p.t_disk + p.t_h2d + slow.t_compute)
    assert p.t_compute - slow.t_compute == pytest.approx(moe * (links.sync_s - links.readback_s))
    assert "tok/s" in p.report(mb, Links()) and "bound by disk->host" in p.report(mb, Links())


def test_too_small_budget_states_a_minimum_that_works():
    mb = ModelBytes.from_config(ModelConfig.from_dict(MODELS["v3"]), "nvfp4", "mlp")
    with pytest.raises(BudgetError, match="minimum is about") as e:
        plan(mb, "3GB", "96GB")
    value, unit = re.search(r"minimum is about ([0-9.]+) (GB|MB)", str(e.value)).groups()
    minimum = float(value) * (1e9 if unit == "GB" else 1e6)
    plan(mb, int(minimum * 1.01), "96GB")     # the stated minimum (rounded in the message) is enough
    with pytest.raises(BudgetError, match="host_memory .* too small"):
        plan(mb, "16GB", "1GB")
    with pytest.raises(ValueError, match="max_gpu_layers"):
        plan(mb, "16GB", "96GB", max_gpu_layers=0)


def test_minimum_budgets_are_exact():
    from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
    mb = ModelBytes.from_config(ModelConfig.from_dict(MODELS["v3"]), "nvfp4", "mlp")
    g, h = minimum_gpu_memory(mb), minimum_host_memory(mb)
    plan(mb, g, h)
    with pytest.raises(BudgetError):
        plan(mb, g - 16, h)
    with pytest.raises(BudgetError):
        plan(mb, g, h - 96)


# ---- fewer active experts: the options `dsjax plan` prints -------------------------------------------------------

def _quality_file() -> dict:
    """The packaged table, read here without the planner's loader."""
    import json
    import os
    import dsjax
    with open(os.path.join(os.path.dirname(dsjax.__file__), "data", "active_experts_quality.json")) as f:
        return json.load(f)


def test_active_experts_options_are_the_plans_of_each_k_on_v3():
    """V3 (top-8) at 16 GB / 96 GB: the measured fractions 4/3/2/1 of 4 give k = 8, 6, 4, 2; each row is plan() of
    that k, and fewer experts never plan slower (disk-bound at 8: fewer expert bytes per token is faster)."""
    from dsjax.runtime.planner import active_experts_options
    mb = ModelBytes.from_config(ModelConfig.from_dict(MODELS["v3"]), "nvfp4", "mlp")
    quality = _quality_file()
    links = Links(h2d=50e9, disk=12e9)
    rows = active_experts_options(mb, "16GB", "96GB", quality, links=links, context_tokens=4096)
    assert [r.k for r in rows] == [8, 6, 4, 2] and not any(r.selected for r in rows)
    for r in rows:
        # the same model with its config saying k experts per token: the bytes without with_top_k
        mb_k = ModelBytes.from_config(ModelConfig.from_dict(dict(MODELS["v3"], num_experts_per_tok=r.k)), "nvfp4",
                                      "mlp")
        direct = plan(mb_k, "16GB", "96GB", links=links, context_tokens=4096)
        assert r.placement.tokens_per_s == direct.tokens_per_s, (r.k, r.placement.tokens_per_s, direct.tokens_per_s)
        assert (r.placement.h2d_bytes_per_token, r.placement.disk_bytes_per_token) == (
            direct.h2d_bytes_per_token, direct.disk_bytes_per_token)
        assert r.quality == next(q for q in quality["rows"] if q["k"] * 8 == r.k * quality["top_k"])
    speeds = [r.placement.tokens_per_s for r in rows]
    assert speeds == sorted(speeds) and speeds[1] > speeds[0], speeds
    assert rows[0].k == mb.top_k and rows[0].quality["perplexity_increase"] == 0
    assert rows[0].quality["top1_agreement"] == 1 and rows[0].quality["kl_nats"] == 0


def test_active_experts_options_fractions_selection_and_budgets():
    from dsjax.runtime.planner import active_experts_options
    quality = _quality_file()
    assert [r.k for r in active_experts_options(_toy(K=4), 1600, 9600, quality, max_gpu_layers=1,
                                                prefetch_layers=1, context_tokens=1)] == [4, 3, 2, 1]
    # top-6: only 6/6 and 3/6 were measured (as 4/4 and 2/4); an asked-for 5 is planned with no quality figures
    rows = active_experts_options(_toy(E=16, K=6), 1600, 9600, quality, selected=5, max_gpu_layers=1,
                                  prefetch_layers=1, context_tokens=1)
    assert [(r.k, r.selected, r.quality and r.quality["k"]) for r in rows] == [(6, False, 4), (5, True, None),
                                                                               (3, False, 2)]
    # the planned mb already routes to 2: the rows still start at the model's own 4, and 2 is the selected one
    rows = active_experts_options(_toy(K=4).with_top_k(2), 1600, 9600, quality, selected=2, max_gpu_layers=1,
                                  prefetch_layers=1, context_tokens=1)
    assert [(r.k, r.selected) for r in rows] == [(4, False), (3, False), (2, True), (1, False)]
    # a GPU budget whose expert pool holds 2 x (1 + 1) experts in flight but not 4 x 2: k = 4 and 3 do not fit
    mb = _toy(K=4, expert=100, core=10, head=10)
    rows = active_experts_options(mb, 16 * 4 * 100 // 4 + 16, 96000, quality, max_gpu_layers=1, prefetch_layers=1,
                                  context_tokens=1)
    assert [(r.k, r.placement is None) for r in rows] == [(4, True), (3, True), (2, False), (1, False)]
    assert active_experts_options(_toy(K=0), 1600, 9600, quality) == []


def test_quality_file_agrees_with_results_md():
    """dsjax/data/active_experts_quality.json and bench/RESULTS.md's table come from one run of
    bench/active_experts_quality.py: same figures to RESULTS' printed digits."""
    import os
    quality = _quality_file()
    assert quality["model"] == "shakespeare-v3-tiny" and quality["top_k"] == 4
    assert quality["measured"]["script"] == "bench/active_experts_quality.py"
    text = open(os.path.join(os.path.dirname(__file__), "..", "bench", "RESULTS.md")).read()
    section = text.split("## Fewer active experts (issue 20, item 3)")[1]
    table = re.findall(r"^\| (\d) \([-\d]\) \| ([\d.]+) \| ([+\-\d.]+)% \| ([\d.]+) \| ([\d.]+) \|", section, re.M)
    assert [int(t[0]) for t in table] == [r["k"] for r in quality["rows"]] == [4, 3, 2, 1]
    for (_, ppl, inc, top1, kl), r in zip(table, quality["rows"]):
        assert (ppl, inc, top1, kl) == (f"{r['perplexity']:.2f}", f"{100 * r['perplexity_increase']:+.1f}",
                                        f"{r['top1_agreement']:.3f}", f"{r['kl_nats']:.4f}"), (table, r)
        assert r["fraction"] == r["k"] / quality["top_k"]


def test_attention_peak_by_hand_and_in_the_report():
    from dsjax.runtime.planner import attention_peak_bytes
    import dataclasses
    GiB = 1 << 30
    mb = dataclasses.replace(_toy(), attention=(128, 128, 128, 512))          # V3's MLA dims
    # 4,096 context, 16 chunk rows: alone, naive (keys 4096 x 128 x 256 x 4 = 0.5 GiB) in blocks of 256 queries
    # (128 x 2 x 4096 x 4 = 4 MiB a query: 1 GiB); the chunk rows' keys (8 GiB) send them absorbed, blocks of 8 queries
    # (16 x 128 x (8192 + 1024) x 4 = 72 MiB a query: 0.56 GiB). The prompt alone is the larger.
    assert attention_peak_bytes(mb, 4096, 4096) == GiB + GiB // 2
    # 1,024 context, 4 chunk rows: alone 1 GiB of scores + 1/8 GiB of keys; the rows: keys 0.5 GiB (naive kept), one
    # block of 256 queries at 4 x 128 x 2048 x 4 = 4 MiB each: 1 GiB. The rows are the larger.
    assert attention_peak_bytes(mb, 1024, 1024) == GiB + GiB // 2
    assert attention_peak_bytes(mb, 1024, 256) == GiB + GiB // 8   # one chunk row: 1/4 GiB + 1/8; alone: 1 + 1/8
    assert attention_peak_bytes(_toy(), 4096) == 0                  # dims unknown: nothing claimed
    # the report says it, and says when it is more than the GPU reserve (2/16 of the budget)
    small = plan(mb, 64 << 10, 9600, max_gpu_layers=1, prefetch_layers=1, context_tokens=4096).report(mb, Links())
    assert "attention: the largest call" in small and "1.61 GB" in small and "MORE than the reserve" in small
    p = plan(mb, 16 * 2 * GiB, 9600, max_gpu_layers=1, prefetch_layers=1, context_tokens=4096)
    assert p.attention_peak == GiB + GiB // 2 and "MORE than the reserve" not in p.report(mb, Links())
    with pytest.raises(ValueError, match="step_tokens=0 must be >= 1"):
        plan(mb, 16 * 2 * GiB, 9600, max_gpu_layers=1, prefetch_layers=1, context_tokens=4096, step_tokens=0)


def test_the_report_names_the_card_a_gpu_budget_needs_under_jaxs_allocator_fraction():
    """JAX gives a process 75% of the card unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (bench/RESULTS.md run
    12: 59.4 of 79.2 GiB on an H100): a 16 GB budget needs a 21.33 GB card as started, 16.84 GB at .95; no line
    without a GPU budget."""
    mb = _toy()
    report = plan(mb, "16GB", 9600, max_gpu_layers=1, prefetch_layers=1).report(mb, Links())
    line = next(ln for ln in report.splitlines() if ln.startswith("the card:"))
    assert "needs a card of 21.33 GB, or 16.84 GB with XLA_PYTHON_CLIENT_MEM_FRACTION=.95" in line, line
    unlimited = plan(mb, 2**60, 9600, max_gpu_layers=1, prefetch_layers=1).report(mb, Links())
    assert "the card:" not in unlimited

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
    slow = plan(mb, "16GB", "96GB", links=Links(h2d=50e9, disk=12e9), overlap_io=False)
    assert slow.t_token == pytest.approx(p.t_disk + p.t_h2d + p.t_compute)
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

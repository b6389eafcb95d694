"""ModelConfig from HF config.json: every model family in deepseek-spec.md §1, derived values, clear errors."""

import dataclasses
import json

import numpy as np
import pytest

from dsjax.config import ConfigError, ModelConfig
from dsjax.model.layers import rope_inv_freq

YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)
COMMON = dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512, moe_layer_freq=1)

# Values from the hub configs tabulated in reference/deepseek-spec.md §1.
MODELS = {
    "v3": dict(COMMON, model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3,
               n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
               topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
               moe_intermediate_size=2048, intermediate_size=18432, q_lora_rank=1536, num_attention_heads=128,
               rope_theta=10000, rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0),
               max_position_embeddings=163840, rms_norm_eps=1e-6, vocab_size=129280, num_nextn_predict_layers=1),
    "v2": dict(COMMON, model_type="deepseek_v2", hidden_size=5120, num_hidden_layers=60, first_k_dense_replace=1,
               n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
               topk_method="group_limited_greedy", scoring_func="softmax", routed_scaling_factor=16.0,
               norm_topk_prob=False, moe_intermediate_size=1536, intermediate_size=12288, q_lora_rank=1536,
               num_attention_heads=128, rope_theta=10000, rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707),
               max_position_embeddings=163840, rms_norm_eps=1e-6, vocab_size=102400),
    "v2_lite": dict(COMMON, model_type="deepseek_v2", hidden_size=2048, num_hidden_layers=27,
                    first_k_dense_replace=1, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                    n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax", routed_scaling_factor=1.0,
                    norm_topk_prob=False, moe_intermediate_size=1408, intermediate_size=10944, q_lora_rank=None,
                    num_attention_heads=16, rope_theta=10000,
                    rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707),
                    max_position_embeddings=163840, rms_norm_eps=1e-6, vocab_size=102400),
    "moonlight": dict(COMMON, model_type="deepseek_v3", hidden_size=2048, num_hidden_layers=27,
                      first_k_dense_replace=1, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                      n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                      routed_scaling_factor=2.446, norm_topk_prob=True, moe_intermediate_size=1408,
                      intermediate_size=11264, q_lora_rank=None, num_attention_heads=16, rope_theta=50000,
                      rope_scaling=None, max_position_embeddings=8192, rms_norm_eps=1e-5, vocab_size=163840),
    "kimi_k2": dict(COMMON, model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], hidden_size=7168,
                    num_hidden_layers=61, first_k_dense_replace=1, n_routed_experts=384, n_shared_experts=1,
                    num_experts_per_tok=8, n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                    routed_scaling_factor=2.827, norm_topk_prob=True, moe_intermediate_size=2048,
                    intermediate_size=18432, q_lora_rank=1536, num_attention_heads=64, rope_theta=50000,
                    rope_scaling=dict(YARN, factor=32, beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                    max_position_embeddings=131072, rms_norm_eps=1e-6, vocab_size=163840),
    "kimi_k2_0905": dict(COMMON, model_type="kimi_k2", hidden_size=7168, num_hidden_layers=61,
                         first_k_dense_replace=1, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
                         n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True,
                         moe_intermediate_size=2048, intermediate_size=18432, q_lora_rank=1536,
                         num_attention_heads=64, rope_theta=50000,
                         rope_scaling=dict(YARN, factor=64, beta_fast=1.0, beta_slow=1.0, mscale=1.0,
                                           mscale_all_dim=1.0),
                         max_position_embeddings=262144, rms_norm_eps=1e-6, vocab_size=163840),
}

# deepseek-spec.md §1 "Derived": softmax scales computed independently of this code.
SOFTMAX_SCALE = {"v3": 0.1352338, "v2": 0.1147214, "v2_lite": 0.1147214, "kimi_k2": 0.1308608,
                 "kimi_k2_0905": 0.1446796, "moonlight": 0.0721688}


@pytest.mark.parametrize("name", list(MODELS))
def test_softmax_scale_matches_spec(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MODELS[name]))
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.softmax_scale == pytest.approx(SOFTMAX_SCALE[name], abs=5e-7)


def test_frozen_and_hashable():
    a = ModelConfig.from_dict(MODELS["v3"])
    b = ModelConfig.from_dict(dict(MODELS["v3"]))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.hidden_size = 1


def test_v3_layer_kinds_and_cache_dim():
    cfg = ModelConfig.from_dict(MODELS["v3"])
    assert cfg.layer_kinds[:4] == ("dense", "dense", "dense", "moe")
    assert cfg.layer_kinds.count("moe") == 58 and len(cfg.layer_kinds) == 61  # MTP layer 61 is not a layer here
    assert cfg.kv_cache_dim == 576
    assert cfg.num_nextn_predict_layers == 1


def test_v2_defaults_when_fields_absent():
    raw = {k: v for k, v in MODELS["v2_lite"].items()
           if k not in ("topk_method", "scoring_func", "norm_topk_prob", "n_group", "topk_group")}
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.topk_method, cfg.scoring_func, cfg.norm_topk_prob, cfg.n_group) == ("greedy", "softmax", False, 1)


@pytest.mark.parametrize("name,low,high", [("v3", 10, 23), ("v2", 10, 23), ("kimi_k2", 19, 20)])
def test_yarn_correction_range(name, low, high):
    """Dims below `low` keep the original frequency, dims from `high` on are fully interpolated (spec §1)."""
    cfg = ModelConfig.from_dict(MODELS[name])
    d = cfg.qk_rope_head_dim
    extra = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2) / d))
    inter = extra / cfg.rope_scaling.factor
    inv = rope_inv_freq(cfg)
    np.testing.assert_allclose(inv[: low + 1], extra[: low + 1], rtol=1e-6)
    np.testing.assert_allclose(inv[high:], inter[high:], rtol=1e-6)
    mid = inv[low + 1: high]
    assert np.all((mid < extra[low + 1: high]) & (mid > inter[low + 1: high]))


def test_rope_parameters_v5_layout():
    raw = dict(MODELS["v3"])
    rs = raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["rope_parameters"] = dict(rs, rope_type="yarn", rope_theta=10000.0)
    assert ModelConfig.from_dict(raw) == ModelConfig.from_dict(MODELS["v3"])


def test_text_config_wrapper():
    assert ModelConfig.from_dict({"text_config": MODELS["kimi_k2"]}).n_routed_experts == 384


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers", "kv_lora_rank",
                                   "num_attention_heads", "moe_intermediate_size"])
def test_missing_required_field_named(field):
    raw = {k: v for k, v in MODELS["v3"].items() if k != field}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(raw)


def test_unknown_model_type():
    with pytest.raises(ConfigError, match="llama"):
        ModelConfig.from_dict(dict(MODELS["v3"], model_type="llama", architectures=["LlamaForCausalLM"]))


@pytest.mark.parametrize("change,field", [
    (dict(n_group=7), "n_group"), (dict(topk_group=9), "topk_group"), (dict(topk_method="best"), "topk_method"),
    (dict(scoring_func="relu"), "scoring_func"), (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(num_experts_per_tok=300), "num_experts_per_tok"),
    (dict(rope_scaling=dict(type="dynamic", factor=2)), "rope_scaling"),
])
def test_impossible_values_named(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(dict(MODELS["v3"], **change))


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)


BAD_VALUES = [
    (dict(moe_intermediate_size=-2048), r"moe_intermediate_size=-2048 must not be negative"),
    (dict(n_routed_experts=-16), r"n_routed_experts=-16 must be positive"),
    (dict(n_routed_experts=0), r"n_routed_experts=0 must be positive \(or absent/null"),
    (dict(intermediate_size=0), r"intermediate_size=0 must be positive: the model has dense MLP layers"),
    (dict(intermediate_size=-5), r"intermediate_size=-5 must not be negative"),
    (dict(hidden_size=0), r"hidden_size=0 must be positive"),
    (dict(v_head_dim=-128), r"v_head_dim=-128 must be positive"),
    (dict(q_lora_rank=0), r"q_lora_rank=0 must be positive \(or null"),
    (dict(n_shared_experts=-1), r"n_shared_experts=-1 must not be negative"),
    (dict(num_experts_per_tok=-8), r"num_experts_per_tok=-8 must be positive"),
    (dict(first_k_dense_replace=-1), r"first_k_dense_replace=-1 must not be negative"),
    (dict(max_position_embeddings=0), r"max_position_embeddings=0 must be positive"),
    (dict(n_group=0), r"n_group=0 must be >= 1"),
    (dict(routed_scaling_factor=-2.5), r"routed_scaling_factor=-2.5 must be a positive finite number"),
    (dict(rms_norm_eps=float("nan")), r"rms_norm_eps=nan must be a positive finite number"),
    (dict(rope_theta=0), r"rope_theta=0.0 must be a positive finite number"),
    (dict(rope_scaling=dict(YARN, factor=-40)), r"rope_scaling.factor=-40.0 must be a positive finite number"),
    (dict(hidden_size=7168.5), r"hidden_size=7168.5 must be an integer"),
    (dict(num_attention_heads="128"), r"num_attention_heads='128' must be an integer"),
]


@pytest.mark.parametrize("change, match", BAD_VALUES, ids=[f"{k}={v!r}" for c, _ in BAD_VALUES for k, v in c.items()])
def test_every_size_and_ratio_is_validated(change, match):
    """A negative or zero width used to pass: `dsjax plan` printed negative bytes and a tok/s figure."""
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(dict(MODELS["v3"], **change))


def test_dense_model_needs_no_expert_fields():
    dense = {k: v for k, v in MODELS["v3"].items() if k not in ("n_routed_experts", "moe_intermediate_size")}
    assert not ModelConfig.from_dict(dense).has_moe


def test_plan_refuses_a_negative_width(tmp_path, capsys):
    from dsjax.cli import main
    (tmp_path / "config.json").write_text(json.dumps(dict(MODELS["v3"], moe_intermediate_size=-2048)))
    assert main(["plan", str(tmp_path)]) == 2
    assert "moe_intermediate_size=-2048 must not be negative" in capsys.readouterr().err


def test_path_that_is_missing_a_file_or_binary(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        ModelConfig.from_json(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00\xff\xfe{}")
    with pytest.raises(ConfigError, match="not valid JSON .*give a checkpoint directory or its config.json"):
        ModelConfig.from_json(tmp_path / "model.safetensors")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"not a model config \(a JSON list"):
        ModelConfig.from_json(tmp_path / "list.json")

"""Small model configurations shared by tests (no files; weights from dsjax.model.random_weights)."""

from dsjax.config import ModelConfig

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
            max_position_embeddings=256)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0,
            mscale=1.0, mscale_all_dim=1.0)

CONFIGS = {
    "v3": dict(BASE, model_type="deepseek_v3", q_lora_rank=24, n_group=4, topk_group=2, topk_method="noaux_tc",
               scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, rope_scaling=YARN),
    "v2_lite": dict(BASE, model_type="deepseek_v2", q_lora_rank=None, n_group=1, topk_group=1, topk_method="greedy",
                    scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2,
                    rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
    "v2": dict(BASE, model_type="deepseek_v2", q_lora_rank=24, n_group=4, topk_group=2,
               topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
               routed_scaling_factor=16.0),
    "moonlight": dict(BASE, model_type="deepseek_v3", q_lora_rank=None, n_group=1, topk_group=1,
                      topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                      routed_scaling_factor=2.446, rope_theta=50000.0, rms_norm_eps=1e-5),
}


def config(name: str, **over) -> ModelConfig:
    return ModelConfig.from_dict(dict(CONFIGS[name], **over))

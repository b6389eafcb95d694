"""Grouped FP4 expert matmuls for MoE (per-slot weights, rows sorted by slot) and the fused SwiGLU expert MLP."""

from dsjax_kernels.moe_gmm.kernel import MoeGmmConfig, default_config, expert_swiglu, moe_gmm, tile_schedule
from dsjax_kernels.moe_gmm.reference import expert_swiglu_reference, moe_gmm_reference, weight_parts

__all__ = ["MoeGmmConfig", "default_config", "expert_swiglu", "expert_swiglu_reference", "moe_gmm",
           "moe_gmm_reference", "tile_schedule", "weight_parts"]

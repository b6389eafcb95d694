"""The weight pytree: names, shapes and dtypes of every tensor, known before any byte moves.

Layout: {"embed": [V, D], "final_norm": [D], "lm_head": [V, D], "layers": [layer dict, ...]}. Linear weights keep
HF's [out, in] orientation (FP4 packs along `in`); routed experts are stacked on axis 0. Router weight and bias stay
float32. HF tensor names live only in dsjax/store/hf_names.py.
"""

# V vocab, D hidden, H heads, Q q latent, C kv latent, R rope dim, N nope dim, Vd value dim, E experts, I intermediate

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig

F32_KEYS = frozenset({"router", "router_bias"})  # never cast to the compute dtype


def layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Shapes of layer i's tensors (dense or MoE by the config's layer rule)."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    s: dict[str, tuple[int, ...]] = {"attn_norm": (D,), "mlp_norm": (D,)}
    if cfg.q_lora_rank is None:
        s["q"] = (H * cfg.qk_head_dim, D)
    else:
        s.update(q_a=(cfg.q_lora_rank, D), q_a_norm=(cfg.q_lora_rank,), q_b=(H * cfg.qk_head_dim, cfg.q_lora_rank))
    s.update(kv_a=(C + R, D), kv_a_norm=(C,), kv_b=(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), C),
             o=(D, H * cfg.v_head_dim))
    if cfg.is_moe_layer(i):
        E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
        s.update(router=(E, D), experts_gate=(E, I, D), experts_up=(E, I, D), experts_down=(E, D, I))
        if cfg.uses_router_bias:
            s["router_bias"] = (E,)
        if cfg.n_shared_experts:
            Is = cfg.shared_intermediate_size
            s.update(shared_gate=(Is, D), shared_up=(Is, D), shared_down=(D, Is))
    else:
        I = cfg.intermediate_size
        s.update(gate=(I, D), up=(I, D), down=(D, I))
    return s


def global_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    V, D = cfg.vocab_size, cfg.hidden_size
    return {"embed": (V, D), "final_norm": (D,), "lm_head": (V, D)}


def tensor_dtype(key: str, dtype) -> np.dtype:
    return np.dtype(np.float32) if key in F32_KEYS else np.dtype(dtype)


def abstract_weights(cfg: ModelConfig, dtype=jnp.bfloat16) -> dict:
    """The weight pytree as jax.ShapeDtypeStruct leaves."""
    def spec(shapes):
        return {k: jax.ShapeDtypeStruct(v, tensor_dtype(k, dtype)) for k, v in shapes.items()}
    out = spec(global_shapes(cfg))
    out["layers"] = [spec(layer_shapes(cfg, i)) for i in range(cfg.num_hidden_layers)]
    return out


def random_weights(cfg: ModelConfig, seed: int = 0, dtype=np.float32, std: float = 0.1) -> dict:
    """Deterministic random weights as numpy arrays (norms near 1, small negative-and-positive router bias)."""
    rng = np.random.default_rng(seed)

    def make(key, shape):
        if key.endswith("norm"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif key == "router_bias":
            a = 0.05 * rng.standard_normal(shape)
        else:
            fan_in = shape[-1]
            a = rng.standard_normal(shape) * min(std, 1.0 / np.sqrt(fan_in))
        return a.astype(tensor_dtype(key, dtype))

    out = {k: make(k, v) for k, v in global_shapes(cfg).items()}
    out["embed"] = (rng.standard_normal(out["embed"].shape)).astype(tensor_dtype("embed", dtype))
    out["layers"] = [{k: make(k, v) for k, v in layer_shapes(cfg, i).items()} for i in range(cfg.num_hidden_layers)]
    return out

"""Mixture-of-experts math: the router (every DeepSeek routing variant) and the routed-expert combination.

`route` is the ExpertRouter's math: it returns the selected experts, their combine weights and the full score
matrix (the runtime reads these for caching, prediction and statistics). `routed_experts` runs the SwiGLU experts
on token rows sorted by expert id through `ops.expert_mlp`; the expert axis of the weights may be all experts or a
set of GPU slots, with `idx` naming rows of that axis. Math: reference/deepseek-spec.md §2.8.
"""

# T tokens, D hidden, E experts, G groups, K top-k, A assignments (T*K), I intermediate

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsjax import ops
from dsjax.config import ModelConfig


class Routing(NamedTuple):
    idx: jax.Array      # [T, K] int32 selected experts
    weight: jax.Array   # [T, K] float32 combine weights (unbiased scores, normalized, scaled)
    scores: jax.Array   # [T, E] float32 sigmoid/softmax scores (before bias), for prediction and stats


def route(x: jax.Array, router: jax.Array, bias: jax.Array | None, cfg: ModelConfig) -> Routing:
    """Group-limited top-k routing of x [T, D] (router logits in float32, like HF)."""
    T = x.shape[0]
    E, K, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
    logits = ops.einsum_f32("td,ed->te", x.astype(jnp.float32), router.astype(jnp.float32))
    s = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    sel = s + bias.astype(jnp.float32)[None] if (cfg.topk_method == "noaux_tc" and bias is not None) else s
    if G > 1 and cfg.topk_method in ("noaux_tc", "group_limited_greedy"):
        g = sel.reshape(T, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(g, 2)[0].sum(-1)            # sum of the 2 best biased scores
        else:
            group_score = g.max(-1)
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)          # [T, TG]
        kept = jnp.zeros((T, G), bool).at[jnp.arange(T)[:, None], keep].set(True)
        sel = jnp.where(kept[:, :, None], g, -jnp.inf).reshape(T, E)  # masked groups at -inf, not 0
    _, idx = jax.lax.top_k(sel, K)
    w = jnp.take_along_axis(s, idx, axis=-1)                          # weights from UNBIASED scores
    # The model's own K decides (remote code: top_k > 1 and norm_topk_prob); with active_experts = k < K the k weights
    # are renormalised as the model renormalises its K, k = 1 included (cfg.with_top_k)
    if cfg.norm_topk_prob and cfg.model_top_k > 1:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return Routing(idx.astype(jnp.int32), w * cfg.routed_scaling_factor, s)


def expert_rows(x: jax.Array, idx: jax.Array, w_gate, w_up, w_down) -> jax.Array:
    """Expert_{idx[t, k]}(x[t]) for every assignment: x [T, D], idx [T, K] rows of the stacked weights -> [T, K, D]."""
    T, K = idx.shape
    E = w_gate.shape[0]
    flat = idx.reshape(-1)                                            # [A]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    y = ops.expert_mlp(x[order // K], w_gate, w_up, w_down, group_sizes)  # [A, D] rows sorted by expert
    return jnp.zeros_like(y).at[order].set(y).reshape(T, K, -1)       # back to [T, K, D] in top-k order


def combine(y: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    """sum_k weight[t, k] * y[t, k] in top-k order: [T, K, D] -> [T, D]."""
    return ops.einsum_f32("tkd,tk->td", y.astype(jnp.float32), weight.astype(jnp.float32)).astype(dtype)


def routed_experts(x: jax.Array, idx: jax.Array, weight: jax.Array, w_gate, w_up, w_down) -> jax.Array:
    """sum_k weight[t, k] * Expert_{idx[t, k]}(x[t]) for x [T, D]; experts stacked on axis 0 of the weights.

    The K contributions of a token are summed in top-k order, whatever rows of the weights hold the experts, so the
    result does not depend on which GPU slot an expert sits in (the runtime's same-tokens invariant).
    """
    return combine(expert_rows(x, idx, w_gate, w_up, w_down), weight, x.dtype)

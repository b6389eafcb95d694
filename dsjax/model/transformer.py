"""Decoder layers and the model's ends (embedding, final norm, lm_head), as pure functions of explicit weights.

Every layer function takes its own weights as an argument, so one compiled executable serves every layer of a kind
(dense or MoE) and the runtime decides where those weights live. `layer_step` is the jitted entry point with the
layer's KV cache donated. MTP layers (index >= num_hidden_layers) are not part of this model.
"""

# B batch, T tokens, D hidden, V vocab

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax import ops
from dsjax.config import ModelConfig
from dsjax.model.attention import MlaForm, attention
from dsjax.model.layers import embed, rms_norm, swiglu_mlp
from dsjax.model.moe import Routing, combine, expert_rows, route


def attn_route(w: dict, x: jax.Array, cache: dict, positions: jax.Array, cfg: ModelConfig, kind: str,
               form: MlaForm = "absorbed", pages: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array, dict, Routing | None]:
    """First half of a layer: attention, residual, FFN norm and (MoE) routing. Returns (h, normed h, cache, routing).

    The runtime reads the routing to bring the selected experts to the GPU before `ffn_finish` runs. `pages`: the
    cache is a paged pool shared by requests, and these are the batch rows' page tables (attention.attention).
    """
    with jax.named_scope("attention"):
        a, cache = attention(w, rms_norm(x, w["attn_norm"], cfg.rms_norm_eps), cache, positions, cfg, form, pages)
    h = x + a
    hn = rms_norm(h, w["mlp_norm"], cfg.rms_norm_eps)
    routing = None
    if kind == "moe":
        B, T, D = hn.shape
        with jax.named_scope("router"):
            routing = route(hn.reshape(B * T, D), w["router"], w.get("router_bias"), cfg)
    return h, hn, cache, routing


def ffn_finish(w: dict, h: jax.Array, hn: jax.Array, kind: str, idx: jax.Array | None = None,
               weight: jax.Array | None = None, experts: tuple | None = None) -> jax.Array:
    """Second half of a layer: h + FFN(hn). For MoE, `experts` = (gate, up, down) stacked on axis 0 and `idx` [B*T, K]
    names rows of that axis (expert ids when all experts are given, GPU slot ids for a slot pool)."""
    if kind != "moe":
        with jax.named_scope("mlp"):
            return h + swiglu_mlp(hn, w["gate"], w["up"], w["down"])
    B, T, D = hn.shape
    with jax.named_scope("experts"):
        rows = expert_rows(hn.reshape(B * T, D), idx, *experts)
    return moe_output(w, h, hn, rows, weight)


def shared_experts(w: dict, hn: jax.Array) -> jax.Array | None:
    """The shared experts' output [B*T, D] for normed hn [B, T, D] (None when the layer has none)."""
    if "shared_gate" not in w:
        return None
    B, T, D = hn.shape
    with jax.named_scope("shared_experts"):
        return swiglu_mlp(hn.reshape(B * T, D), w["shared_gate"], w["shared_up"], w["shared_down"])


def moe_output(w: dict, h: jax.Array, hn: jax.Array, rows: jax.Array, weight: jax.Array,
               shared: jax.Array | None = None) -> jax.Array:
    """h + combine(expert rows [B*T, K, D], weights) + shared experts(hn): the one place MoE outputs are summed,
    so the all-in-memory path and the runtime's chunked expert path give the same bits. `shared`: the shared
    experts' output when it was computed earlier (the runtime runs it while routed experts are fetched)."""
    B, T, D = hn.shape
    y = combine(rows, weight, hn.dtype)
    if shared is None:
        shared = shared_experts(w, hn)
    if shared is not None:
        y = y + shared
    return h + y.reshape(B, T, D)


def layer_forward(w: dict, x: jax.Array, cache: dict, positions: jax.Array, cfg: ModelConfig, kind: str,
                  form: MlaForm = "absorbed", pages: jax.Array | None = None
                  ) -> tuple[jax.Array, dict, Routing | None]:
    """One pre-norm decoder layer: x + Attn(norm(x)), then + FFN(norm(.)). Returns (x, cache, routing or None)."""
    h, hn, cache, r = attn_route(w, x, cache, positions, cfg, kind, form, pages)
    if kind == "moe":
        out = ffn_finish(w, h, hn, kind, r.idx, r.weight, (w["experts_gate"], w["experts_up"], w["experts_down"]))
    else:
        out = ffn_finish(w, h, hn, kind)
    return out, cache, r


@functools.partial(jax.jit, static_argnames=("cfg", "kind", "form", "fusion"), donate_argnames=("cache",))
def layer_step(w: dict, x: jax.Array, cache: dict, positions: jax.Array, cfg: ModelConfig, kind: str,
               form: MlaForm = "absorbed", fusion: bool = False, pages: jax.Array | None = None):
    """Jitted `layer_forward`; the cache is donated (updated in place). `fusion`: FP4 ops traced with the fused
    kernels (ops.fusion; a static argument, so each setting has its own executable). `pages`: page tables into a paged
    cache pool (attention.attention)."""
    with ops.fusion(fusion):
        return layer_forward(w, x, cache, positions, cfg, kind, form, pages)


@functools.partial(jax.jit, static_argnames=("dtype",))
def embed_step(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    return embed(tokens, table).astype(dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "fusion"))
def head_step(final_norm: jax.Array, lm_head, x: jax.Array, cfg: ModelConfig, fusion: bool = False) -> jax.Array:
    """Final RMSNorm and lm_head; float32 logits [B, T, V]."""
    with ops.fusion(fusion):
        return ops.linear(rms_norm(x, final_norm, cfg.rms_norm_eps), lm_head).astype(jnp.float32)


def forward(weights: dict, tokens: jax.Array, cfg: ModelConfig, form: MlaForm = "naive") -> jax.Array:
    """Full forward of tokens [B, T] from position 0 with every weight at hand (tests, small models)."""
    from dsjax.model.attention import init_layer_cache
    B, T = tokens.shape
    dtype = weights["embed"].dtype
    x = embed_step(weights["embed"], tokens, dtype)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    for i, w in enumerate(weights["layers"]):
        cache = init_layer_cache(B, T, cfg, dtype)
        x, _, _ = layer_step(w, x, cache, positions, cfg, cfg.layer_kind(i), form)
    return head_step(weights["final_norm"], weights["lm_head"], x, cfg)

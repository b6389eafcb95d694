"""Flax NNX face of the model: `DeepseekForCausalLM`, a module tree over the same pure layer functions.

The NNX modules own nothing but their parameters; `__call__` runs `layer_forward`. `nnx.split(model.layers[i])`
yields the layer's (graphdef, state): the state is exactly the weight dict the runtime places on a tier, and
`nnx.merge` rebuilds the layer around weights wherever they live. The engine calls the pure functions directly.

Example:
    >>> model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> logits = model(tokens)                      # [B, T, V] float32
    >>> graphdef, state = nnx.split(model.layers[3])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax import ops
from dsjax.config import ModelConfig
from dsjax.model.attention import MlaForm, init_layer_cache
from dsjax.model.layers import embed, rms_norm
from dsjax.model.transformer import layer_forward
from dsjax.model.weights import random_weights


class DecoderLayer(nnx.Module):
    """One decoder layer; its parameters carry the weight-pytree keys (attn_norm, q_a, kv_b, experts_gate, ...)."""

    def __init__(self, cfg: ModelConfig, index: int, weights: dict):
        self.cfg = cfg
        self.kind = cfg.layer_kind(index)
        self.keys = tuple(weights)
        for k, v in weights.items():
            setattr(self, k, nnx.Param(jnp.asarray(v)))

    def weights(self) -> dict:
        return {k: getattr(self, k).get_value() for k in self.keys}

    def __call__(self, x, cache, positions, form: MlaForm = "naive"):
        return layer_forward(self.weights(), x, cache, positions, self.cfg, self.kind, form)


class DeepseekForCausalLM(nnx.Module):
    """A DeepSeek model as an NNX module, from a weight pytree or randomly initialized from `rngs`."""

    def __init__(self, cfg: ModelConfig, weights: dict | None = None, *, rngs: nnx.Rngs | None = None,
                 dtype=jnp.float32):
        if weights is None:
            seed = int(jax.random.randint(rngs.params(), (), 0, 2**31 - 1)) if rngs is not None else 0
            weights = random_weights(cfg, seed=seed, dtype=np.dtype(dtype))
        self.cfg = cfg
        self.embed = nnx.Param(jnp.asarray(weights["embed"]))
        self.final_norm = nnx.Param(jnp.asarray(weights["final_norm"]))
        self.lm_head = nnx.Param(jnp.asarray(weights["lm_head"]))
        self.layers = nnx.List([DecoderLayer(cfg, i, w) for i, w in enumerate(weights["layers"])])

    def weights(self) -> dict:
        """The plain weight pytree the pure functions and the runtime use."""
        return {"embed": self.embed.get_value(), "final_norm": self.final_norm.get_value(), "lm_head": self.lm_head.get_value(),
                "layers": [layer.weights() for layer in self.layers]}

    def __call__(self, tokens: jax.Array, form: MlaForm = "naive") -> jax.Array:
        B, T = tokens.shape
        x = embed(tokens, self.embed.get_value())
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        for layer in self.layers:
            x, _, _ = layer(x, init_layer_cache(B, T, self.cfg, x.dtype), positions, form)
        return ops.linear(rms_norm(x, self.final_norm.get_value(), self.cfg.rms_norm_eps),
                          self.lm_head.get_value()).astype(jnp.float32)

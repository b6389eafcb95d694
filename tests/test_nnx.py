"""The Flax NNX module computes the pure model, and splits per layer into the weight dict the runtime places."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.model import forward, layer_step, init_layer_cache
from dsjax.model.nnx import DeepseekForCausalLM
from model_configs import config


def test_nnx_module_equals_pure_forward():
    cfg = config("v3")
    model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(model, ids)),
                               np.asarray(forward(model.weights(), ids, cfg)), rtol=1e-5, atol=1e-5)


def test_split_layer_state_is_the_weight_dict_and_merge_round_trips():
    cfg = config("moonlight")
    model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model.layers[1])
    flat = {path[0]: v for path, v in nnx.to_flat_state(state)}
    assert set(flat) == set(model.layers[1].weights())
    x = jnp.ones((1, 4, cfg.hidden_size))
    pos = jnp.arange(4)[None]
    merged = nnx.merge(graphdef, state)
    a, _, _ = merged(x, init_layer_cache(1, 4, cfg, jnp.float32), pos)
    b, _, _ = layer_step(model.layers[1].weights(), x, init_layer_cache(1, 4, cfg, jnp.float32), pos, cfg, "moe",
                         "naive")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)

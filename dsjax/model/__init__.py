"""The DeepSeek model as pure math over explicit weight pytrees (see dsjax/model/weights.py for the layout)."""

from dsjax.model.attention import init_layer_cache
from dsjax.model.moe import Routing, route
from dsjax.model.transformer import (attn_route, embed_step, ffn_finish, forward, head_step, layer_forward,
                                     layer_step)
from dsjax.model.weights import abstract_weights, layer_shapes, random_weights

__all__ = ["Routing", "abstract_weights", "attn_route", "embed_step", "ffn_finish", "forward", "head_step", "init_layer_cache",
           "layer_forward", "layer_shapes", "layer_step", "random_weights", "route"]

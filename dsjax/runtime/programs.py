"""LayerPrograms: the per-layer jitted calls of the tiered runtime, compiled once per layer kind and shape bucket.

Weights are arguments (never constants), the KV pool is donated. The calls are the halves of a decoder layer from
dsjax/model/transformer.py, so the tiered runtime computes exactly the model's math:

    attn(w, x, cache, pos, pages, valid, next_routers)  -> h, hn, cache, top-k ids, weights, predicted next-layer
                                            experts, shared-expert output (when use_parallel_compute)
    dense(w, h, hn)                       -> x
    rows_direct(hn, ids, experts)                    every expert on the GPU: rows [T, K, D] with no host sync
    moe_rows(pool, slot_ids, hn, acc)                one chunk of experts in GPU slots -> rows of [T, K, D]
    moe_out(w, h, hn, rows, weights, shared)         combine in top-k order + shared experts (model.moe_output)
    merge(groups) / split(x, shapes)                 a step's groups (decode rows, prefill chunks) as one token axis
                                                     for the expert half, and back

Both expert paths end in the same `moe_out` executable, so where the experts sat cannot change the result; a step's
groups share one pass over each layer's experts (the bytes that cross the links), each token's rows independent of
the others'.
"""

# B batch, T tokens, N tokens of a step's groups together, D hidden, K top-k, E experts, P GPU expert slots

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsjax import ops
from dsjax.config import ModelConfig
from dsjax.model.moe import expert_rows, route
from dsjax.model.transformer import attn_route, ffn_finish, moe_output, shared_experts


def _predict(hn_flat: jax.Array, routers: tuple, cfg: ModelConfig, valid: jax.Array | None = None) -> jax.Array:
    """Predicted activation probability per expert of the next MoE layers [len(routers), E]: their routers applied
    to this layer's normed hidden state. An expert outside a token's predicted top-k gets 0; inside it, top_k times
    its share of the predicted top-k weight, capped at 1 (1 = at least an average share), so `expert_threshold`
    means the same for top-4 and top-8 models (a raw share averages 1/top_k: with V3's top-8 and near-even
    weights every share sat below 0.15 and nothing was ever prefetched). Maximized over the batch's real tokens
    (`valid` [T]; padding predicts nothing)."""
    out = []
    K = cfg.num_experts_per_tok
    for router, bias in routers:
        r = route(hn_flat, router, bias, cfg)
        share = r.weight / (r.weight.sum(-1, keepdims=True) + 1e-20)                  # [T, K]
        rel = jnp.minimum(share.astype(jnp.float32) * K, 1.0)
        p = jnp.zeros((hn_flat.shape[0], cfg.n_routed_experts), jnp.float32)
        p = p.at[jnp.arange(hn_flat.shape[0])[:, None], r.idx].set(rel)
        if valid is not None:
            p = jnp.where(valid[:, None], p, 0.0)
        out.append(p.max(0))
    return jnp.stack(out) if out else jnp.zeros((0, cfg.n_routed_experts), jnp.float32)


def _dense(w: dict, h: jax.Array, hn: jax.Array) -> jax.Array:
    return ffn_finish(w, h, hn, "dense")


def _merge(hs, hns, idxs, weights, shareds):
    """A step's groups [(B_g, T_g, D)...] as one token axis [N, 1, D] (and [N, K] routing, [N, D] shared output)."""
    flat = lambda xs: jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
    h, hn = flat(hs)[:, None], flat(hns)[:, None]
    shared = None if shareds[0] is None else flat(shareds)
    return h, hn, flat(idxs), flat(weights), shared


def _split(x, shapes):
    out, at = [], 0
    for B, T in shapes:
        out.append(x[at:at + B * T].reshape(B, T, x.shape[-1]))
        at += B * T
    return tuple(out)


class LayerPrograms:
    """The jitted halves of the decoder layers for one model config and set of options (see the module docstring).
    Not a scheduler: the engine's Scheduler (scheduler.py) decides what a step computes; these are what it calls."""

    _shared: dict = {}

    @classmethod
    def shared(cls, cfg: ModelConfig, **options) -> "LayerPrograms":
        """The scheduler for a model config and options, shared by every engine that asks for the same: its jitted
        calls (and so their compiled executables, one per shape) are reused when a model is loaded again, e.g. with
        other budgets or presets, instead of compiling everything anew."""
        key = (cfg, tuple(sorted(options.items())))
        if key not in cls._shared:
            cls._shared[key] = cls(cfg, **options)
        return cls._shared[key]

    def __init__(self, cfg: ModelConfig, *, use_cuda_graph: bool = True, parallel_shared: bool = True,
                 enable_fusion: bool = True):
        self.cfg = cfg
        self.parallel_shared = parallel_shared
        self.enable_fusion = enable_fusion
        opts = None
        if not use_cuda_graph and jax.default_backend() == "gpu":
            opts = {"xla_gpu_enable_command_buffer": ""}       # no CUDA-graph capture inside the executables
        self.compiler_options = opts
        def jit(fn, **kw):
            # Kernels vs references is decided while tracing; each scheduler owns its executables, so the
            # choice is part of what they were compiled with.
            @functools.wraps(fn)
            def traced(*args, **kwargs):
                with ops.fusion(enable_fusion):
                    return fn(*args, **kwargs)
            return jax.jit(traced, compiler_options=opts, **kw)

        self.attn = jit(self._attn, static_argnames=("kind", "form"), donate_argnames=("cache",))
        self.dense = jit(_dense)
        self.rows_direct = jit(self._rows_direct)
        self.moe_rows = jit(self._moe_rows, donate_argnames=("acc",))
        self.moe_rows_out = jit(self._moe_rows_out)
        self.moe_out = jit(moe_output)
        self.merge = jit(_merge)
        self.split = jit(_split, static_argnames=("shapes",))

    def _attn(self, w, x, cache, positions, pages, valid, next_routers, kind, form):
        h, hn, cache, r = attn_route(w, x, cache, positions, self.cfg, kind, form, pages)
        B, T, D = hn.shape
        v = None if valid is None else valid.reshape(B * T)
        if kind != "moe":     # a dense layer predicts the MoE layers after it too (V3's layer 3 follows 3 dense ones)
            pred = _predict(hn.reshape(B * T, D), next_routers, self.cfg, v) if next_routers else None
            return h, hn, cache, None, None, pred, None
        pred = _predict(hn.reshape(B * T, D), next_routers, self.cfg, v)
        shared = shared_experts(w, hn) if self.parallel_shared else None
        return h, hn, cache, r.idx, r.weight, pred, shared

    @staticmethod
    def _rows_direct(hn, idx, experts):
        B, T, D = hn.shape
        return expert_rows(hn.reshape(B * T, D), idx, *experts)

    @staticmethod
    def _moe_rows_out(pool, slot_idx, hn, w, h, weight, shared):
        """A MoE layer whose routed experts all sit in the GPU slots at once (a decode step's usual case): the rows
        from zeros and the combine (moe_output) in one executable, one dispatch where zeros + moe_rows + moe_out are
        three."""
        B, T, D = hn.shape
        acc = jnp.zeros((B * T, slot_idx.shape[1], D), hn.dtype)
        return moe_output(w, h, hn, LayerPrograms._moe_rows(pool, slot_idx, hn, acc), weight, shared)

    @staticmethod
    def _moe_rows(pool, slot_idx, hn, acc):
        """Rows of the assignments whose experts sit in GPU slots now: slot_idx [T, K] holds the slot of each
        assignment of this chunk and P (one past the last slot) elsewhere; the others keep their `acc` rows.

        The kernels read the slots in place: groups are the P slots (empty ones cost nothing, their weights are
        never read) and the other chunks' assignments sort past the last group, where rows come out as zeros. The
        references dequantize every expert they are given, so they get only the chunk's slots, gathered (at most
        min(T*K, P), a static size: one executable per batch shape). Each expert's group holds exactly its own rows
        either way, as when every expert is on the GPU."""
        B, T, D = hn.shape
        x = hn.reshape(B * T, D)
        P = jax.tree.leaves(pool)[0].shape[0]
        mask = slot_idx < P
        if ops.fp4_path(x, pool["gate"], pool["up"], pool["down"]) == "kernel":
            rows = expert_rows(x, slot_idx, pool["gate"], pool["up"], pool["down"])
        else:
            n = min(slot_idx.size, P)
            used = jnp.unique(slot_idx, size=n, fill_value=P)                       # sorted; P fills the rest
            local = jnp.where(mask, jnp.searchsorted(used, slot_idx), n).astype(jnp.int32)
            experts = jax.tree.map(lambda a: a[jnp.minimum(used, P - 1)], pool)     # [n, ...]
            rows = expert_rows(x, local, experts["gate"], experts["up"], experts["down"])
        return jnp.where(mask[..., None], rows, acc)

"""Expert parallelism over a JAX Mesh for an engine whose weights are all resident (issue 22, the all-in-HBM slice).

Owns: the partition of each MoE layer's routed experts over the devices of a mesh's `expert` axis
(`partition_experts`, `ExpertShards`), placing a weight pytree on the mesh (`place_layer`), the expert-parallel MoE
layer call, `ExpertParallelEngine` (the request Engine with that layer call) and `load_parallel`.
Does not own: the request loop (engine.py, reused unchanged), tiers and budgets (tiered.py: tiered expert parallelism
is not built), the placement plan for several devices (plan_devices.py), several hosts.

The scheme (jax-llm-examples' deepseek_r1_jax): the embedding, attention, norms, routers, shared experts and the head
are replicated on every device and so are the tokens and the KV pool; device d holds the routed experts
`partition_experts` gave it, stacked [S, ...] where S is the largest share (a shorter share is padded with zero
experts that no id maps to, so every device's block has one shape and a plain shard_map applies). A table [N, E] maps
a global expert id to its local slot on each device (S on the devices that do not hold it). Each device computes the
rows of the assignments whose expert it holds and zero rows for the others, and one psum over `expert` gives every
device every row: exactly one device contributes a non-zero value to each, so the sum is that value bit for bit, and
the K rows of a token are then combined in top-k order by `moe_output`, the single-device code, so logits and tokens
equal the single-device engine's (on the CPU bit for bit: see `_as_global_stack`). The psum carries [A, K, D] rows, K
times a combined output; `exact_combine=False` psums float32 partial sums instead (last bits may differ). XLA's
ragged all-to-all would move fewer bytes but is slow on GPUs today.
"""

# N devices on the expert axis, E experts, S expert slots per device, B batch, T tokens, K top-k, D hidden, A = B*T

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsjax import ops
from dsjax.config import ModelConfig
from dsjax.model import init_layer_cache
from dsjax.model.attention import MlaForm
from dsjax.model.moe import expert_rows
from dsjax.model.transformer import attn_route, moe_output, shared_experts
from dsjax.model.weights import F32_KEYS
from dsjax.quant import QTensor
from dsjax.runtime.engine import DEFAULT_CONTEXT, Engine
from dsjax.runtime.kv_pool import PAGE_TOKENS, KVPool
from dsjax.runtime.metrics import device_memory
from dsjax.runtime.plan_devices import ACTIVATION_RESERVE, device_weight_bytes
from dsjax.runtime.planner import BudgetError, fmt_bytes
from dsjax.runtime.popularity import as_popularity, layer_popularity
from dsjax.runtime.requests import PromptError

AXIS = "expert"
# keywords load_parallel takes beside its own (the Engine's); the tiered runtime's options do not apply
ENGINE_OPTIONS = frozenset({"max_batch_size", "min_batch_size", "dynamic_batch", "max_context", "step_tokens",
                            "kv_pages", "enable_fusion", "popularity", "exact_combine", "active_experts"})
EXPERT_KEYS = ("experts_gate", "experts_up", "experts_down")
SLOTS_KEY = "expert_slots"           # a MoE layer's [N, E] table: local slot of each expert on each device

__all__ = ["AXIS", "ExpertParallelEngine", "ExpertShards", "as_mesh", "device_stats", "load_parallel",
           "partition_experts", "place_layer"]


# ---- the partition (pure numpy) -----------------------------------------------------------------------------------

def partition_experts(popularity, expert_bytes, n_devices: int) -> list[np.ndarray]:
    """Split one MoE layer's routed experts over `n_devices`: a list of n sorted arrays of expert ids, disjoint, whose
    union is every expert.

    Bytes first, popularity second. When every expert weighs the same (any real store: one shape and format per layer)
    each device gets ceil(E/n) experts at most, so the shares differ by at most one expert and pad to equal blocks;
    otherwise a device may pass its fair share E_bytes/n by less than one expert. Within that cap experts are placed
    most popular first on the device with the least popularity so far (longest-processing-time greedy), so hot experts
    spread out instead of landing together as `e % n` would put every n-th expert. Without popularity (None) the
    greedy order is the id order and the result is exactly `e % n`, which spreads DeepSeek's routing groups (runs of
    E/n_group consecutive ids) evenly over the devices.

    Args:
        popularity: None, or [E] non-negative counts or frequencies (measured activations of the layer).
        expert_bytes: one int (every expert) or [E] bytes per expert.
        n_devices: devices on the expert axis.

    Example:
        >>> partition_experts(None, 1000, 4)[1]
        array([ 1,  5,  9, 13])         # for E = 16 given by popularity or an [E] expert_bytes
        >>> partition_experts(np.r_[np.ones(8) * 9, np.ones(8)], [1000] * 16, 2)    # 4 hot experts each
    """
    if n_devices < 1:
        raise ValueError(f"n_devices={n_devices} must be >= 1")
    b = np.asarray(expert_bytes, np.float64)
    if popularity is None and b.ndim == 0:
        raise ValueError("partition_experts needs the number of experts: give popularity [E] or expert_bytes [E]")
    E = len(popularity) if popularity is not None else len(b)
    pop = np.ones(E) if popularity is None else np.asarray(popularity, np.float64)
    b = np.broadcast_to(b, (E,)) if b.ndim == 0 else b
    if pop.shape != (E,) or b.shape != (E,):
        raise ValueError(f"popularity {pop.shape} and expert_bytes {b.shape} must both be [E]")
    if (pop < 0).any() or not np.isfinite(pop).all() or (b <= 0).any():
        raise ValueError("popularity must be finite and >= 0 and expert_bytes > 0")
    equal = bool((b == b[0]).all())
    cap_count = -(-E // n_devices) if equal else E
    cap_bytes = np.inf if equal else b.sum() / n_devices + b.max()
    load = np.zeros(n_devices)                 # popularity placed on each device
    held = np.zeros(n_devices)                 # bytes placed on each device
    count = np.zeros(n_devices, np.int64)
    owner = np.empty(E, np.int64)
    for e in np.lexsort((np.arange(E), -b, -pop)):        # most popular first; then largest; then lowest id
        room = (count < cap_count) & (held + b[e] <= cap_bytes)
        if not room.any():                                 # cannot happen (a device below the mean always has room)
            room = held == held.min()
        d = min(np.flatnonzero(room), key=lambda d: (load[d], held[d], d))
        owner[e] = d
        load[d] += pop[e]
        held[d] += b[e]
        count[d] += 1
    return [np.flatnonzero(owner == d) for d in range(n_devices)]


@dataclasses.dataclass(frozen=True)
class ExpertShards:
    """Where one MoE layer's routed experts live on the expert axis.

    `experts[d]` are the global ids device d holds, in the order of its local slots; `size` (S) is the slot count of
    every device (the largest share; shorter shares end in padding slots no id maps to).
    """

    experts: tuple[np.ndarray, ...]
    n_experts: int

    @classmethod
    def from_partition(cls, parts: Sequence[np.ndarray], n_experts: int) -> ExpertShards:
        parts = tuple(np.asarray(p, np.int64) for p in parts)
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if len(ids) != n_experts or not np.array_equal(np.sort(ids), np.arange(n_experts)):
            raise ValueError(f"a partition must hold each of the {n_experts} experts exactly once")
        return cls(parts, n_experts)

    @property
    def n_devices(self) -> int:
        return len(self.experts)

    @property
    def size(self) -> int:
        return max(len(p) for p in self.experts)

    def slots(self) -> np.ndarray:
        """[N, E] int32: the local slot of expert e on device d, or S where d does not hold e."""
        table = np.full((self.n_devices, self.n_experts), self.size, np.int32)
        for d, ids in enumerate(self.experts):
            table[d, ids] = np.arange(len(ids), dtype=np.int32)
        return table


# ---- the mesh and the placement -----------------------------------------------------------------------------------

def as_mesh(devices) -> Mesh:
    """A Mesh with an `expert` axis from N (the first N devices), a list of jax devices, or a Mesh (returned as is;
    it must have an `expert` axis; other axes replicate)."""
    if isinstance(devices, Mesh):
        if AXIS not in devices.axis_names:
            raise ValueError(f"the mesh has axes {devices.axis_names}; expert parallelism needs an {AXIS!r} axis")
        return devices
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        have = jax.devices()
        if not 1 <= devices <= len(have):
            names = ", ".join(str(d) for d in have[:8]) + (", ..." if len(have) > 8 else "")
            fix = "give at least 1" if devices < 1 else device_count_fix(devices, have)
            raise ValueError(f"devices={devices}: this process sees {len(have)} device(s) ({names}); {fix}")
        return Mesh(np.array(have[:devices]), (AXIS,))
    devs = list(devices)
    if not devs or len(set(devs)) != len(devs):
        raise ValueError("devices: give N, a non-empty list of distinct jax devices, or a Mesh")
    return Mesh(np.array(devs), (AXIS,))


def device_count_fix(n: int, have: Sequence) -> str:
    """What to do when `n` devices are asked for and JAX sees only `have`."""
    if have[0].platform == "cpu":
        return (f"on the CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts (or use "
                f"at most {len(have)})")
    return (f"use at most {len(have)}, or make more visible (CUDA_VISIBLE_DEVICES; other hosts join with "
            "--coordinator/--num-processes/--process-id)")


def _replicate(a, mesh: Mesh):
    return jax.device_put(a, NamedSharding(mesh, P()))


def _shard_stack(per_device: Sequence[np.ndarray], mesh: Mesh) -> jax.Array:
    """One global array [N*S, ...] sharded over `expert` from each device's block [S, ...] (host arrays); each device
    receives only its own block."""
    S = per_device[0].shape[0]
    shape = (len(per_device) * S,) + per_device[0].shape[1:]
    sharding = NamedSharding(mesh, P(AXIS))
    blocks = [jax.device_put(per_device[(idx[0].start or 0) // S], dev)
              for dev, idx in sharding.addressable_devices_indices_map(shape).items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, blocks)


def _pad(a: np.ndarray, S: int) -> np.ndarray:
    """Padding slots are zeros: a zero expert (and a zero global scale for FP4) that no id maps to."""
    return a if a.shape[0] == S else np.concatenate([a, np.zeros((S - a.shape[0],) + a.shape[1:], a.dtype)])


def _stack_on_mesh(blocks: Sequence, mesh: Mesh):
    """Per-device expert stacks of one projection (numpy arrays or QTensors of numpy) -> one sharded array/QTensor."""
    S = max(b.shape[0] for b in blocks)
    if isinstance(blocks[0], QTensor):
        fields = ("packed", "scales", "global_scale")
        parts = {f: _shard_stack([_pad(np.asarray(getattr(b, f)), S) for b in blocks], mesh) for f in fields}
        return QTensor(**parts, fmt=blocks[0].fmt)
    return _shard_stack([_pad(np.asarray(b), S) for b in blocks], mesh)


def place_layer(w: dict, mesh: Mesh, shards: ExpertShards | None, dtype) -> dict:
    """One layer's weights on the mesh: routed experts split by `shards` (and its slot table, sharded, under
    'expert_slots'), everything else replicated in `dtype` (routers float32, FP4 tensors as they are). `w` holds
    numpy or jax arrays anywhere; experts stacked [E, ...] as the model takes them."""
    def plain(k, a):
        if isinstance(a, QTensor):
            return jax.tree.map(lambda x: _replicate(x, mesh), a)
        a = a if k in F32_KEYS else a.astype(dtype)
        return _replicate(a, mesh)

    out = {k: plain(k, a) for k, a in w.items() if k not in EXPERT_KEYS}
    if shards is not None:
        for k in EXPERT_KEYS:
            stack = w[k]
            host = (jax.tree.map(np.asarray, stack) if isinstance(stack, QTensor)
                    else np.asarray(stack).astype(dtype))
            out[k] = _stack_on_mesh([jax.tree.map(lambda a, ids=ids: a[ids], host) for ids in shards.experts], mesh)
        out[SLOTS_KEY] = _shard_stack(list(shards.slots()[:, None]), mesh)
    return out


def _expert_nbytes(w: dict) -> int:
    """Bytes of one routed expert (gate + up + down) of a layer's stacked [E, ...] weights."""
    total = 0
    for k in EXPERT_KEYS:
        for a in jax.tree.leaves(w[k]):
            total += a.size * np.dtype(a.dtype).itemsize // a.shape[0]
    return total


# ---- the expert-parallel MoE layer --------------------------------------------------------------------------------

def _as_global_stack(w, slots: jax.Array, n_experts: int):
    """This device's experts [S, ...] scattered into a zero stack [E, ...] at their global ids. XLA's CPU backend runs
    a grouped matmul densely (jax's ragged_dot lowering contracts over groups x features), so a row's rounding depends
    on how many groups the stack has: with the single-device engine's E groups a row is computed bit for bit as there.
    Only on the CPU, where that lowering and the reference dequantization (already [E, ...] dense) are used anyway."""
    S = jax.tree.leaves(w)[0].shape[0]
    gid = jnp.full((S,), n_experts, jnp.int32).at[slots[0]].set(jnp.arange(n_experts, dtype=jnp.int32), mode="drop")
    return jax.tree.map(lambda a: jnp.zeros((n_experts,) + a.shape[1:], a.dtype).at[gid].set(a, mode="drop"), w)


def _local_rows(x, idx, weight, slots, gate, up, down, *, exact: bool, dense_cpu: bool):
    """On one device: rows of the assignments whose expert this device holds, zero for the rest; summed over the
    expert axis. x [A, D], idx/weight [A, K], slots [1, E] (this device's row of the table)."""
    S, E = gate.shape[0], slots.shape[1]
    local = slots[0][idx]                                              # [A, K] local slot, S if held elsewhere
    held = local < S
    if dense_cpu:
        gate, up, down = (_as_global_stack(w, slots, E) for w in (gate, up, down))
        rows = expert_rows(x, jnp.where(held, idx, E), gate, up, down)  # id E sorts last and is never computed
    else:
        rows = expert_rows(x, local, gate, up, down)                    # slot S sorts last and is never computed
    rows = jnp.where(held[..., None], rows, jnp.zeros_like(rows))      # [A, K, D]
    if exact:
        return jax.lax.psum(rows, AXIS)
    y = ops.einsum_f32("tkd,tk->td", rows.astype(jnp.float32), weight.astype(jnp.float32))
    return jax.lax.psum(y, AXIS)                                       # [A, D] float32 partial sums


@functools.partial(jax.jit, static_argnames=("cfg", "form", "fusion", "mesh", "exact"), donate_argnames=("cache",))
def moe_layer_step(w: dict, x: jax.Array, cache: dict, positions: jax.Array, cfg: ModelConfig,
                   form: MlaForm = "absorbed", fusion: bool = False, pages: jax.Array | None = None, *,
                   mesh: Mesh, exact: bool = True):
    """One MoE layer with its routed experts split over `mesh`'s expert axis (w from `place_layer`); the cache is
    donated. `exact`: psum the expert rows [A, K, D] and combine them once, as one device would (the same bits);
    otherwise each device combines its rows in float32 and the psum adds [A, D] partial sums (K/2 times fewer bytes
    than bf16 rows; the sum's order differs from one device's, so the last bits may)."""
    with ops.fusion(fusion):
        h, hn, cache, r = attn_route(w, x, cache, positions, cfg, "moe", form, pages)
        B, T, D = hn.shape
        spec = P(AXIS)
        # check_vma off: the expert MLP may be a Pallas call, which carries no varying-axis rule; the psum makes the
        # output the same on every device, so out_specs P() holds.
        dense_cpu = mesh.devices.flat[0].platform == "cpu"
        rows = jax.shard_map(functools.partial(_local_rows, exact=exact, dense_cpu=dense_cpu), mesh=mesh,
                             in_specs=(P(), P(), P(), spec, spec, spec, spec), out_specs=P(), check_vma=False)(
            hn.reshape(B * T, D), r.idx, r.weight, w[SLOTS_KEY], *(w[k] for k in EXPERT_KEYS))
        if exact:
            out = moe_output(w, h, hn, rows, r.weight)
        else:
            y = rows.astype(hn.dtype)
            shared = shared_experts(w, hn)
            out = h + (y if shared is None else y + shared).reshape(B, T, D)
    return out, cache, r


# ---- the engine ---------------------------------------------------------------------------------------------------

class ExpertParallelEngine(Engine):
    """The request Engine with each MoE layer's routed experts split over a mesh's `expert` axis; everything else
    (and the KV pool) replicated. Build it with `load_parallel`, or from a weight pytree placed by `place_layer`.

    Same prompt, parameters and seed give the same tokens as the one-device engine: the per-assignment rows are the
    same rows (see the module docstring) and are combined by the same code. On GPUs a device runs its grouped matmul
    over its S slots instead of all E experts; that is bit-exact as long as the kernel's per-row arithmetic does not
    depend on the number of groups (the FP4 kernels tile rows within a group; not yet checked on several GPUs).

    Example:
        >>> engine = load_parallel("v3-nvfp4-store", devices=8)
        >>> engine.generate("Hello", max_new_tokens=8).text; engine.stats()["parallel"]
    """

    def __init__(self, cfg: ModelConfig, weights: dict, tokenizer=None, *, mesh: Mesh,
                 shards: dict[int, ExpertShards], exact: bool = True, kv_pages: int | None = None,
                 max_batch_size: int = 32, max_context: int | None = None, **kwargs):
        self.mesh = mesh
        self.shards = shards
        self.exact = exact
        self._replicated = NamedSharding(mesh, P())
        # The base class builds its KV pool on one device; give it the smallest pool it accepts (one request) and
        # replace it with the replicated pool of the size asked for.
        limit = min(cfg.max_position_embeddings, max_context or DEFAULT_CONTEXT)
        per_request = math.ceil(limit / PAGE_TOKENS)
        super().__init__(cfg, weights, tokenizer, kv_pages=per_request, max_batch_size=max_batch_size,
                         max_context=max_context, device=mesh.devices.flat[0], **kwargs)
        pages = kv_pages if kv_pages is not None else max_batch_size * per_request
        self.kv = KVPool(cfg, pages, self.dtype, self._replicated)
        if self.kv.pages < per_request:
            raise PromptError(f"the KV pool holds {self.kv.capacity_tokens} tokens, less than one request of "
                              f"max_context={limit}; lower max_context or give the pool more memory")

    @property
    def n_devices(self) -> int:
        return int(self.mesh.shape[AXIS])

    def _new_caches(self, batch: int, length: int) -> list[dict]:
        return [jax.device_put(init_layer_cache(batch, length, self.config, self.dtype), self._replicated)
                for _ in range(self.config.num_hidden_layers)]

    def _layer(self, i: int, w: dict, x, cache: dict, positions, form, pages):
        """A MoE layer's experts are split over the mesh (one psum of the rows); other layers as on one device."""
        if SLOTS_KEY not in w:
            return super()._layer(i, w, x, cache, positions, form, pages)
        x, cache, r = moe_layer_step(w, x, cache, positions, self.config, form, self.enable_fusion, pages,
                                     mesh=self.mesh, exact=self.exact)
        return x, cache, r              # the routing (replicated) is counted: stats()' assignments per device

    def placement(self) -> dict[str, Any]:
        """Per device: its routed experts per MoE layer (global ids) and the bytes they take (padding excluded)."""
        per = _expert_nbytes_placed(self.weights, self.shards)
        return {"devices": [str(d) for d in self.mesh.devices.flat], "axis": AXIS, "exact_combine": self.exact,
                "experts": {i: [s.tolist() for s in sh.experts] for i, sh in self.shards.items()},
                "expert_bytes": per, "slots_per_device": {i: sh.size for i, sh in self.shards.items()}}

    def stats(self) -> dict[str, Any]:
        """The Engine's stats, plus under 'parallel': per device ('per_device', see `device_stats`) and the totals
        ('total': experts, bytes, assignments; 'imbalance': the busiest device's assignments over the mean)."""
        base = super().stats()
        per = device_stats(self, np.asarray(base["expert_activations"], np.int64))
        total = {k: sum(d[k] for d in per) for k in ("experts", "expert_bytes", "weight_bytes", "assignments")}
        mean = total["assignments"] / len(per)
        return {**base, "parallel": {"devices": self.n_devices, "processes": jax.process_count(),
                                     "expert_bytes": [d["expert_bytes"] for d in per], "exact_combine": self.exact,
                                     "per_device": per, "total": total,
                                     "imbalance": max(d["assignments"] for d in per) / mean if mean else None}}


def _bytes_per_device(tree, devices: Sequence) -> list[int]:
    """Bytes each device holds of a pytree of global arrays, from their shardings (a padded expert block counts
    whole; replicated arrays count on every device). Works for devices of other processes too."""
    where = {dev: d for d, dev in enumerate(devices)}
    out = [0] * len(devices)
    for a in jax.tree.leaves(tree):
        if not isinstance(a, jax.Array):
            continue
        item = np.dtype(a.dtype).itemsize
        for dev, idx in a.sharding.devices_indices_map(a.shape).items():
            if dev in where:
                out[where[dev]] += item * math.prod(len(range(*sl.indices(n))) for sl, n in zip(idx, a.shape))
    return out


def device_stats(engine: ExpertParallelEngine, activations: np.ndarray) -> list[dict[str, Any]]:
    """Per device of the mesh: its routed experts (count over every MoE layer, and their bytes without padding),
    every weight byte it holds (its expert blocks with padding and its copy of the rest), its copy of the KV pool,
    the assignments (token-expert pairs of real tokens) it computed since load = the load balance, and the backend's
    memory figures where this process can read them (its own devices; None on a backend without them, e.g. CPU).
    `activations`: [n_layers, E] routed pairs per layer (Engine.stats()['expert_activations'])."""
    devs = list(engine.mesh.devices.flat)
    expert_bytes = _expert_nbytes_placed(engine.weights, engine.shards)
    weight_bytes = _bytes_per_device(engine.weights, devs)
    assigned = activations.sum()
    out = []
    for d, dev in enumerate(devs):
        n = sum(len(sh.experts[d]) for sh in engine.shards.values())
        a = int(sum(activations[i, sh.experts[d]].sum() for i, sh in engine.shards.items())) if activations.size else 0
        mem = device_memory(dev if dev.process_index == jax.process_index() else None)   # another process's: None
        out.append({"device": str(dev), "process": dev.process_index, "experts": n, "expert_bytes": expert_bytes[d],
                    "weight_bytes": weight_bytes[d], "kv_bytes": engine.kv.nbytes, "assignments": a,
                    "assignment_share": a / assigned if assigned else None,
                    "bytes_in_use": mem["in_use"], "peak_bytes_in_use": mem["peak"]})
    return out


def _expert_nbytes_placed(weights: dict, shards: dict[int, ExpertShards]) -> list[int]:
    """Bytes of real (not padding) routed experts on each device, over all MoE layers."""
    n = next(iter(shards.values())).n_devices if shards else 1
    per = [0] * n
    for i, sh in shards.items():
        w = weights["layers"][i]
        one = sum(a.size * np.dtype(a.dtype).itemsize for k in EXPERT_KEYS for a in jax.tree.leaves(w[k]))
        one //= sh.size * sh.n_devices
        for d, ids in enumerate(sh.experts):
            per[d] += len(ids) * one
    return per


# ---- loading ------------------------------------------------------------------------------------------------------

def _layer_shards(cfg: ModelConfig, layer: int, popularity, expert_bytes: int, n_devices: int) -> ExpertShards:
    E = cfg.n_routed_experts
    parts = partition_experts(layer_popularity(popularity, layer, E), [expert_bytes] * E, n_devices)
    return ExpertShards.from_partition(parts, E)


def _store_layers(store, cfg: ModelConfig, mesh: Mesh, dtype, popularity, progress: bool):
    """Place a dsjax store layer by layer: each device reads only its own experts' bytes from the store."""
    from tqdm.auto import tqdm

    from dsjax.store.manifest import PLAIN_PART
    from dsjax.store.reader import PROJECTIONS
    N = int(mesh.shape[AXIS])
    # Core units pass through host memory (pinned where the backend has it) of one of this process's devices on
    # their way to every device.
    first = jax.local_devices()[0]
    kind = "pinned_host" if "pinned_host" in [m.kind for m in first.addressable_memories()] else None

    def core(unit):
        return {k: (jax.tree.map(np.asarray, a) if isinstance(a, QTensor) else np.asarray(a))
                for k, a in store.read_core_unit(unit, kind, device=first).items()}

    ends = {**core("embed"), **core("head")}
    out = {k: place_layer({k: ends[k]}, mesh, None, dtype)[k] for k in ("embed", "final_norm", "lm_head")}
    layers, shards = [], {}
    for i in tqdm(range(cfg.num_hidden_layers), desc="placing layers", unit="layer", disable=not progress):
        w = core(f"layer_{i:03d}")
        placed = place_layer(w, mesh, None, dtype)
        if cfg.is_moe_layer(i):
            one = sum(store.expert_record(i, p).bytes for p in PROJECTIONS) // cfg.n_routed_experts
            sh = shards[i] = _layer_shards(cfg, i, popularity, one, N)
            reads = [store.read_experts(i, ids) for ids in sh.experts]          # all devices' reads in flight
            for proj in PROJECTIONS:
                rec = store.expert_record(i, proj)
                blocks = []
                for futs in reads:
                    parts = futs[proj].result()
                    blocks.append(QTensor(**parts, fmt=rec.dtype) if rec.is_fp4
                                  else parts[PLAIN_PART].astype(dtype))
                placed[f"experts_{proj}"] = _stack_on_mesh(blocks, mesh)
            placed[SLOTS_KEY] = _shard_stack(list(sh.slots()[:, None]), mesh)
        layers.append(placed)
    out["layers"] = layers
    return out, shards


def _local_devices(mesh: Mesh) -> list:
    """The mesh's devices this process owns (all of them in a one-process run; memory_stats() works only on these)."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def _check_budget(mb, n_devices: int, gpu_memory, cfg: ModelConfig, max_context: int | None) -> int:
    """gpu_memory per device against an all-resident device's share: what is left of it for the KV pool, or
    NotImplementedError when the share does not fit (that budget needs tiers)."""
    from dsjax.runtime.planner import parse_bytes
    budget = parse_bytes(gpu_memory, "gpu_memory")
    own = device_weight_bytes(mb, n_devices)
    context = min(cfg.max_position_embeddings, max_context or DEFAULT_CONTEXT)
    need = own + context * mb.kv_bytes_per_token + ACTIVATION_RESERVE
    if need > budget:
        raise NotImplementedError(
            f"gpu_memory={fmt_bytes(budget)} per device cannot hold one device's share over {n_devices} devices: "
            f"about {fmt_bytes(need)} (weights {fmt_bytes(own)}, one request's KV cache of {context} tokens, "
            f"{fmt_bytes(ACTIVATION_RESERVE)} reserve): load it with dsjax.load(path, devices=..., gpu_memory=...) "
            "(tiered expert parallelism streams the experts), use more devices or a larger gpu_memory")
    return budget - own


def fits_resident(path: str, n_devices: int, gpu_memory, dtype, options: dict) -> bool:
    """Whether gpu_memory per device holds an all-resident device's share of the store at `path` over n_devices
    (load_parallel's check); when not, dsjax.load runs tiered expert parallelism instead."""
    from dsjax.runtime.config import active_experts_config
    from dsjax.runtime.load import _dtype
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    store = Store(path)
    try:
        cfg = active_experts_config(store.config, options.get("active_experts", 0))
        mb = model_bytes_from_store(store, _dtype(dtype))
    finally:
        store.close()
    try:
        _check_budget(mb, n_devices, gpu_memory, cfg, options.get("max_context"))
    except NotImplementedError:
        return False
    return True


def _check_fits(need_per_device: int, mesh: Mesh) -> None:
    from dsjax.runtime.tiered import device_free_bytes
    for dev in _local_devices(mesh):
        free = device_free_bytes(dev)
        if free is not None and need_per_device > free:
            raise BudgetError(f"expert parallelism over {mesh.devices.size} devices puts about "
                              f"{fmt_bytes(need_per_device)} on each (everything but the routed experts replicated, "
                              f"the experts split), and {dev} has {fmt_bytes(free)} free; use more devices")


def _kv_pages_that_fit(cfg: ModelConfig, dtype, mesh: Mesh, engine_kwargs: dict,
                       budget_left: int | None = None) -> int | None:
    """Pages for the replicated KV pool: the Engine's default (max_batch_size requests of max_context), fewer where
    the devices have less free memory after the weights, or less of the per-device budget (`budget_left`: gpu_memory
    less the device's weights), ACTIVATION_RESERVE left for activations; None to let the Engine decide (no budget and
    a backend that does not report memory, e.g. the CPU)."""
    from dsjax.runtime.kv_pool import kv_bytes_per_token
    from dsjax.runtime.tiered import device_free_bytes
    free = [device_free_bytes(d) for d in _local_devices(mesh)]
    least = -1 if any(f is None for f in free) else min(free)
    if budget_left is not None:
        least = budget_left if least < 0 else min(least, budget_left)
    if jax.process_count() > 1:         # one pool size on every process: the least free memory of any device
        from jax.experimental import multihost_utils
        every = np.asarray(multihost_utils.process_allgather(np.int64(least)))
        least = -1 if (every < 0).any() else int(every.min())
    if least < 0:
        return None
    limit = min(cfg.max_position_embeddings, engine_kwargs.get("max_context") or DEFAULT_CONTEXT)
    wanted = engine_kwargs.get("max_batch_size", 32) * math.ceil(limit / PAGE_TOKENS)
    page = PAGE_TOKENS * kv_bytes_per_token(cfg, dtype)
    return max(0, min(wanted, (least - ACTIVATION_RESERVE) // page))


def load_parallel(path: str | os.PathLike, devices, dtype: str = "bfloat16", *, popularity=None,
                  prefill_form: MlaForm = "naive", progress: bool | None = None, enable_fusion: bool | None = None,
                  exact_combine: bool = True, active_experts: int = 0, gpu_memory: int | str | None = None,
                  **engine_kwargs) -> ExpertParallelEngine:
    """Load a dsjax store or a Hugging Face checkpoint with every weight resident, routed experts split over devices.

    `devices`: N (the first N of jax.devices()), a list of jax devices, or a Mesh with an `expert` axis.
    `popularity`: measured expert activations to balance the split by (None; [E]; [n_layers, E], e.g. a tiered run's
    Metrics.activations; or {layer: [E]}; or the path of a file written by engine.save_popularity). Budgets (tiered
    expert parallelism) are not built: see plan_devices.py.
    `enable_fusion`: FP4 weights through the fused kernels (default: on for a store, as in_memory=True).
    In a run of several processes (jax.distributed; multihost.initialize) every process calls this with the same
    arguments and gets a multihost.MultiHostEngine: process 0 takes requests, the others call engine.follow().
    `active_experts`: memory_config.active_experts (route each token to its top k; 0 = the model's).
    `gpu_memory` (a store only): each device's budget, "80GB" or bytes. It must hold the device's share of the weights,
    one request's KV cache of max_context and ACTIVATION_RESERVE (else NotImplementedError: that needs tiered expert
    parallelism, not built); the KV pool then takes what is left of it.
    Other keywords go to the Engine (max_batch_size, max_context, kv_pages, ...); by default the KV pool (replicated on
    every device) takes what the devices have free after the weights, less ACTIVATION_RESERVE, up to max_batch_size
    requests of max_context.

    Example:
        >>> engine = load_parallel("v3-nvfp4-store", devices=8)          # 8 x 80 GB: all of V3 at FP4 in HBM
        >>> engine.generate("The capital of France is", max_new_tokens=16).text
    """
    import sys

    from dsjax.runtime.config import active_experts_config
    from dsjax.runtime.load import _dtype
    from dsjax.runtime.tokenizer import Tokenizer
    from dsjax.store.manifest import MANIFEST_FILE
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory; give a dsjax store or a Hugging Face "
                                "checkpoint directory")
    if gpu_memory is not None and not os.path.exists(os.path.join(path, MANIFEST_FILE)):
        raise ValueError(f"{path} is a Hugging Face checkpoint: budgets apply to dsjax stores; convert it first with "
                         "`dsjax convert SRC DST --format nvfp4`, or drop gpu_memory")
    budget_left = None
    dt = _dtype(dtype)
    popularity = as_popularity(popularity)
    mesh = as_mesh(devices)
    N = int(mesh.shape[AXIS])
    idle = sorted(set(range(jax.process_count())) - {d.process_index for d in mesh.devices.flat})
    if idle:
        raise ValueError(f"devices={N}: process(es) {idle} of this {jax.process_count()}-process run own no device of "
                         f"the mesh; every process must take part: give devices={jax.device_count()} (all of them)")
    progress = sys.stderr.isatty() if progress is None else progress
    tok = Tokenizer.from_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    name = os.path.basename(os.path.normpath(path))
    if os.path.exists(os.path.join(path, MANIFEST_FILE)):
        from dsjax.runtime.tiered import model_bytes_from_store
        from dsjax.store.reader import Store
        store = Store(path)
        cfg = active_experts_config(store.config, active_experts)
        mb = model_bytes_from_store(store, dt)
        own = device_weight_bytes(mb, N)
        if gpu_memory is not None:
            budget_left = _check_budget(mb, N, gpu_memory, cfg, engine_kwargs.get("max_context"))
        _check_fits(own, mesh)
        try:
            weights, shards = _store_layers(store, cfg, mesh, dt, popularity, progress)
        finally:
            store.close()
        fusion = True if enable_fusion is None else enable_fusion
    else:
        from tqdm.auto import tqdm

        from dsjax.store.hf_names import read_global, read_layer
        from dsjax.store.safetensors_io import Checkpoint
        cfg = active_experts_config(ModelConfig.from_json(path), active_experts)
        ck = Checkpoint(path)
        try:
            host = {k: read_global(ck, cfg, k, dt) for k in ("embed", "final_norm", "lm_head")}
            weights = {k: place_layer({k: host[k]}, mesh, None, dt)[k] for k in host}
            weights["layers"], shards = [], {}
            for i in tqdm(range(cfg.num_hidden_layers), desc="loading layers", unit="layer", disable=not progress):
                w = read_layer(ck, cfg, i, dt)
                sh = None
                if cfg.is_moe_layer(i):
                    sh = shards[i] = _layer_shards(cfg, i, popularity, _expert_nbytes(w), N)
                weights["layers"].append(place_layer(w, mesh, sh, dt))
        finally:
            ck.close()
        fusion = False if enable_fusion is None else enable_fusion
    if "kv_pages" not in engine_kwargs:
        engine_kwargs["kv_pages"] = _kv_pages_that_fit(cfg, dt, mesh, engine_kwargs, budget_left)
    cls = ExpertParallelEngine
    if jax.process_count() > 1:
        from dsjax.runtime.multihost import MultiHostEngine
        cls = MultiHostEngine
    return cls(cfg, weights, tok, mesh=mesh, shards=shards, exact=exact_combine, prefill_form=prefill_form, name=name,
               dtype=dt, enable_fusion=fusion, **engine_kwargs)

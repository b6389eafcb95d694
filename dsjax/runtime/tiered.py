"""TieredEngine: runs a dsjax store with weights spread over GPU, pinned host memory and NVMe, behind generate().

Per layer: the attention half runs on the GPU (with routing and the next layers' expert predictions); the runtime
reads the top-k ids (one small sync), makes the selected experts resident in GPU slots (from the host cache, or from
disk through it) and runs the expert half. Meanwhile the PrefetchSystem has issued the next layers' weights and the
predicted experts: host->GPU copies for layer L+1, disk->host reads for L+2..L+prefetch_layers. When every expert
fits on the GPU the sync disappears. Same store, prompt and seed give the same tokens under every preset and budget.
"""

# B batch, T tokens, D hidden, K top-k, E experts, P GPU expert slots

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model.weights import F32_KEYS
from dsjax.quant import QTensor
from dsjax.runtime.config import RuntimeConfig, active_experts_config, routing_report
from dsjax.runtime.cpu_path import CpuExpertPath, availability, take_rows
from dsjax.runtime.engine import DEFAULT_CONTEXT, Engine, Group
from dsjax.runtime.expert_layout import PROJ, ExpertLayout
from dsjax.runtime.kv_pool import PAGE_TOKENS, kv_bytes_per_token
from dsjax.runtime.memory import MemoryManager, check_gpu_room, check_host_room, check_pinned_cap, host_available
from dsjax.runtime.metrics import Metrics, device_memory, json_line, process_memory, prometheus_text
from dsjax.runtime.planner import BudgetError, Links, ModelBytes, Pools, attention_dims, fmt_bytes, plan
from dsjax.runtime.popularity import check_hot_room, engine_popularity, hot_set, layer_popularity, popularity_order
from dsjax.runtime.prefetch import (CPU_MAX_ROWS, CPU_PRIOR_BPS, DISK, GPU, HOST, READING, TRIAL_MARGIN,
                                    PrefetchPolicy, StepSample)
from dsjax.runtime.programs import LayerPrograms
from dsjax.runtime.tiers import DiskReader, ExpertCache, HostCache, LayerManager, shardings, tree_nbytes

UNLIMITED = 1 << 60


def model_bytes_from_store(store, dtype="bfloat16") -> ModelBytes:
    """The planner's byte counts, read from the store's manifest (what will actually move); the KV cache in `dtype`."""
    cfg = store.config
    core: dict[str, int] = {}
    expert = 0
    for rec in store.manifest.tensors.values():
        if rec.tier == "core":
            core[rec.unit] = core.get(rec.unit, 0) + rec.bytes
        elif rec.tier == "experts" and rec.unit.split(".")[0] == f"layer_{_first_moe(cfg):03d}":
            expert += rec.bytes // rec.shape[0]
    moe = tuple(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    return ModelBytes(embed=core.get("embed", 0), head=core.get("head", 0),
                      layer_core=tuple(core[f"layer_{i:03d}"] for i in range(cfg.num_hidden_layers)),
                      expert=expert, n_experts=cfg.n_routed_experts or 0, top_k=cfg.num_experts_per_tok or 0,
                      moe_layers=moe, kv_bytes_per_token=kv_bytes_per_token(cfg, jnp.dtype(dtype)),
                      attention=attention_dims(cfg))


def _first_moe(cfg) -> int:
    return next((i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), -1)


def _cast(tree: dict, dtype, sharding) -> dict:
    """Plain tensors to the compute dtype (routers stay float32); QTensors untouched."""
    out = {}
    for k, a in tree.items():
        if isinstance(a, QTensor) or k in F32_KEYS or a.dtype == dtype:
            out[k] = a
        else:
            out[k] = jax.device_put(np.asarray(a).astype(dtype), sharding)
    return out


def _unit(i: int) -> str:
    return f"layer_{i:03d}"


def _expert_tree(store, layer: int, proj: str, parts: dict, sharding):
    """One projection of experts read from the store ({part: numpy [k, ...]}) on `sharding`: a QTensor for FP4, the
    plain weight otherwise."""
    rec = store.expert_record(layer, proj)
    parts = {k: jax.device_put(a, sharding) for k, a in parts.items()}
    return QTensor(**parts, fmt=rec.dtype) if rec.is_fp4 else parts["weight"]


def device_free_bytes(device) -> int | None:
    """Bytes `device` can still allocate (None where the backend does not say, e.g. the CPU)."""
    m = device_memory(device)
    return None if m["limit"] is None else int(m["limit"]) - int(m["in_use"] or 0)


def in_memory_engine(store, dtype, tokenizer=None, *, prefill_form="naive", name: str = "",
                     enable_fusion: bool = True, device=None, active_experts: int = 0) -> Engine:
    """The whole store on the GPU as one in-memory model (the plain Engine: no tiers, no caches, no runtime
    bookkeeping): the all-in-HBM reference that the tiered runtime with no budget is compared against. FP4 weights
    stay FP4; experts are stacked per projection [E, ...] as the model's layer call takes them. `active_experts`:
    memory_config.active_experts."""
    device = device if device is not None else jax.devices()[0]
    cfg, dt = active_experts_config(store.config, active_experts), np.dtype(dtype)
    need, free = model_bytes_from_store(store).total, device_free_bytes(device)
    if free is not None and need > free:
        raise BudgetError(f"in_memory=True puts the whole store on the GPU: about {fmt_bytes(need)}, and the GPU has "
                          f"{fmt_bytes(free)} free; load it tiered instead (dsjax.load(store, gpu_memory=..., "
                          "host_memory=...))")
    weights = store.load_weights(dt, "device", device=device)
    return Engine(cfg, weights, tokenizer, prefill_form=prefill_form, name=name, dtype=dt, enable_fusion=enable_fusion,
                  device=device)


class TieredEngine(Engine):
    """Example:
        >>> engine = dsjax.load("store", preset="balanced", gpu_memory="16GB", host_memory="96GB")
        >>> engine.generate("Hello", max_new_tokens=16).text; engine.stats()
    """

    def __init__(self, store, runtime: RuntimeConfig, dtype, tokenizer=None, *, prefill_form="naive",
                 links: Links | None = None, name: str = "", device=None, popularity=None, devices=None):
        cfg, mb = _model_bytes(store, runtime, dtype)      # every program sees active_experts' k
        # measured expert popularity (memory_config.popularity, or counts given here): the hot set and preload order
        self.popularity, self.popularity_source = engine_popularity(store, runtime.memory_config, popularity)
        self.store = store
        self.runtime = runtime
        # devices: tiered expert parallelism (issue 22). The first device runs everything but the routed experts of
        # the others: each device owns a share of every MoE layer's experts, in its own GPU slots and pinned host
        # cache, copied over its own link; its rows of a layer are merged into the first device's.
        devs = list(devices) if devices is not None else [device if device is not None else jax.devices()[0]]
        if len({d.id for d in devs}) != len(devs):
            raise ValueError(f"devices={devs}: a device is named twice")
        self.device = devs[0]
        mc, cc = runtime.memory_config, runtime.compute_config
        self.metrics = Metrics(cfg.num_hidden_layers, cfg.n_routed_experts or 0)
        self.model_bytes = mb
        self.links = links or (measure_links(store, self.device) if cc.auto_tune else Links())
        gpu, host, context, plan_kw = _plan_args(cfg, runtime, mb)
        budget_per_device = (gpu, host)                  # gpu_memory and host_memory apply to each device
        self.placement = plan(mb, gpu, host, links=self.links, **plan_kw)
        streams = mb.moe_layers and self.placement.gpu_expert_slots < mb.n_experts
        cpu_on, self.cpu_experts_reason = availability(
            cc.cpu_experts, ExpertLayout.of_store(store, mb.moe_layers[0]) if streams else None, self.device.platform)
        if cpu_on and len(devs) > 1:
            if cc.cpu_experts == "on":
                raise ValueError("compute_config.cpu_experts='on' with several devices: the CPU path is built for one "
                                 "device's host cache; set cpu_experts to auto or off, or load on one device")
            cpu_on, self.cpu_experts_reason = False, "several devices (the CPU path serves one device's host cache)"
        cpu_rate = self.links.cpu_rate or CPU_PRIOR_BPS
        if cpu_on:
            # The plan (and stats' predicted_tok_s) counts the CPU path at the kernel's rate (the prior until measured)
            with_cpu = plan(mb, gpu, host, links=dataclasses.replace(self.links, cpu_rate=cpu_rate), **plan_kw)
            # (a gain under the trials' margin is none: the planner's split always gives the CPU a sliver)
            if cc.cpu_experts == "auto" and with_cpu.t_token >= (1 - TRIAL_MARGIN) * self.placement.t_token:
                # The plan models batch 1 only, and larger decode batches are where the path paid on the H100 (run 7:
                # 0.75x at batch 1, 1.29x at batch 8; run 10: auto, gated here, left batch 8 at on_demand's speed): the
                # path is built anyway and the CPU trial times each bucket of rows; the plan's figure stays GPU-only
                self.cpu_experts_reason = "the plan predicts no gain at batch 1; the CPU trial decides per batch"
            else:
                self.placement = with_cpu
        p = self.placement
        # the plan's pinned host bytes against the RAM free now: past it the GPU runtime aborts the process
        check_host_room(p.pinned_host_bytes(mb, len(devs)), host_available(), runtime.host_memory)
        if self.device.platform == "gpu":      # and against the pinned pool's limit (an earlier engine's cap)
            check_pinned_cap(p.pinned_host_peak(mb, len(devs)))
        for d in devs:              # each device's budget against what JAX's allocator gives the process there
            try:
                check_gpu_room(runtime.gpu_memory, d.memory_stats(), str(d))
            except BudgetError:     # arrays of a closed engine that only the cycle collector frees count as in use
                gc.collect()
                check_gpu_room(runtime.gpu_memory, d.memory_stats(), str(d))
        moved = p.gpu_expert_pool - p.pools.expert_cache   # active-pool room the planner gave to experts
        self.mm = MemoryManager(p.pools, {"expert_cache": p.gpu_expert_pool,
                                          "active_layers": p.pools.active_layers - moved})
        s_dev, s_host = shardings(self.device)
        dt = np.dtype(dtype)

        # Ends of the model: the embedding stays in host RAM (a row lookup needs no GPU table); the head on the GPU.
        self._embed_table = np.asarray(store.read_core_unit("embed", "pinned_host")["embed"]).astype(dt)
        self.mm.reserve("host_weights", "embed", mb.embed)
        head = _cast(store.read_core_unit("head", "device"), dt, s_dev)
        self.mm.reserve("active_layers", "head", mb.head)

        # Layer cores: resident, pinned on the host, or read from disk when streamed.
        resident = {}
        for i in p.resident_layers:
            resident[i] = _cast(store.read_core_unit(_unit(i), "device"), dt, s_dev)
            self.mm.reserve("active_layers", ("layer", i), mb.layer_core[i])
        host = {}
        for i in p.host_layers:
            host[i] = _cast(store.read_core_unit(_unit(i), "pinned_host"), dt, s_host)
            self.mm.reserve_first(("host_weights", "host_layer_cache"), ("layer", i), mb.layer_core[i])
        self.layers = LayerManager(resident, host, lambda i: _cast(store.read_core_unit(_unit(i), "pinned_host"),
                                                                     dt, s_host),
                                   p.ring_slots, self.mm, self.metrics,
                                   {i: mb.layer_core[i] for i in range(cfg.num_hidden_layers) if i not in resident},
                                   device=self.device)
        # Routers of every MoE layer stay on the GPU: prediction applies layer L+1's router at layer L.
        self.moe_layers = list(mb.moe_layers)
        self.routers = {}
        for i in self.moe_layers:
            if i in resident:
                w = resident[i]
            elif i in host:
                w = host[i]
            else:
                w = _cast(store.read_core_unit(_unit(i), "pinned_host"), dt, s_host)
            self.routers[i] = (jax.device_put(w["router"], s_dev),
                               jax.device_put(w["router_bias"], s_dev) if "router_bias" in w else None)

        # Experts: all on the GPU when they fit, else a GPU slot pool + a pinned host cache + the disk reader.
        E, moe = mb.n_experts, len(self.moe_layers)
        self.full_experts: dict[int, tuple] = {}
        self.experts = self.host_cache = self.disk = None
        self.movers: list[ExpertMovers] = []             # per device: its expert slots, host cache and link
        self.owner: dict[int, np.ndarray] = {}           # MoE layer -> [E] index (in self.movers) of each expert's device
        self.devices_reason = None                       # why devices beyond the first are left unused
        if moe and p.gpu_expert_slots >= E:
            for i in self.moe_layers:
                futs = store.read_experts(i, range(E))
                self.full_experts[i] = tuple(_expert_tree(store, i, proj, futs[proj].result(), s_dev)
                                             for proj in PROJ)
                self.mm.reserve("expert_cache", ("experts", i), E * mb.expert)
            if len(devs) > 1:
                self.devices_reason = "every routed expert fits the first device's budget"
        elif moe:
            # Both caches hold flat expert buffers, padded a little beyond the planner's stored bytes: size them from
            # their pools in the buffer's bytes (the host cache fills the layer cache first, then the weights pool).
            layout = ExpertLayout.of_store(store, self.moe_layers[0])
            nb = layout.nbytes
            self.owner = {i: _owners(self.popularity, i, E, nb, len(devs)) for i in self.moe_layers}
            share = [max(int((o == d).sum()) for o in self.owner.values()) for d in range(len(devs))]
            host_room = self.mm.free("host_layer_cache") // nb + self.mm.free("host_weights") // nb
            link = DeviceLink(self.metrics)
            self.experts = ExpertCache(min(share[0] * moe, p.gpu_expert_pool // nb), layout, self.mm, link,
                                       device=self.device)
            self.host_cache = HostCache(min(min(p.host_experts, share[0]) * moe, host_room), self.mm, link, nb,
                                        device=self.device)
            self.movers.append(ExpertMovers(self.device, self.experts, self.host_cache, self.mm, link))
            for d, dev in enumerate(devs[1:], 1):
                self.movers.append(_expert_device(dev, share[d] * moe, *budget_per_device, layout, self.metrics))
            self.disk = DiskReader(store, self.metrics, layout)
        # memory_config.hot_experts: the most popular experts of each MoE layer, pinned in GPU slots for good
        self.hot = hot_set(self.popularity, self.moe_layers, E, mc.hot_experts) \
            if self.experts is not None and mc.hot_experts else {}
        self._hot_rows = {i: np.isin(np.arange(E), ex) for i, ex in self.hot.items()}
        self._hot_loaded = False
        self.hot_counters = {"loads": 0, "seconds": 0.0, "hits": 0, "uses": 0, "assignments": 0,
                             "assignments_hot": 0}
        if self.hot:
            check_hot_room(mc.hot_experts, moe, self.experts.slots.capacity, cfg.num_experts_per_tok,
                            mc.prefetch_layers)
        self.sched = LayerPrograms.shared(cfg, use_cuda_graph=cc.use_cuda_graph,
                                          parallel_shared=cc.use_parallel_compute, enable_fusion=cc.enable_fusion)
        # Decide (pure: prefetch.py) apart from move (the movers: self.experts, self.host_cache, self.disk)
        self.policy = PrefetchPolicy(mc.expert_threshold, mc.prefetch_layers, mc.disk_prefetch_layers,
                                     adaptive=cc.adaptive_schedule, overlap=cc.overlap_io, link_bps=self.links.h2d,
                                     expert_bytes=self.host_cache.expert_bytes if self.host_cache else 0)
        self.disk_waits = self._disk_waits_seen = 0      # expert reads the compute had to wait for
        # Host-resident experts computed on the CPU (issue 24): the policy's split_cpu picks them per MoE layer of a
        # decode step; a worker thread runs the kernel on the host cache's buffers while this thread drives the GPU
        self.cpu_path = CpuExpertPath(self.experts.layout, cfg.num_hidden_layers, cc.cpu_threads, cpu_rate) \
            if cpu_on else None
        # under auto, decode steps with and without the path are timed and it runs only where it makes them faster
        self.policy.cpu_trial = self.cpu_path is not None and cc.cpu_experts == "auto"
        self._cpu_step = self.cpu_path is not None        # the step under way may send experts to the CPU path
        self._copy_in_write = cc.expert_copy == "jit"    # a layer's misses copied inside the slot write's executable
        self._step_start = (0.0, 0)                       # (perf_counter, host->GPU bytes) when the step began
        self._step_rows = 0                               # decode rows of the step under way (0: not decode-only)
        self._reads_possible = self.host_cache is not None and \
            self.host_cache.slots.capacity < cfg.n_routed_experts * len(self.moe_layers)   # some on disk
        self._pending: dict[tuple[int, int], Any] = {}      # (layer, expert) -> Future of a disk read
        self._predicted: dict[int, set] = {}
        self._prefetch_pins: dict[int, list] = {}        # layer -> predicted experts copied (and pinned) ahead
        self._copied_ahead: set = set()                   # this step's copies ahead (a demand copy of one = waste)
        self.chunk_reads_ahead = 0                           # experts read ahead of their prefill chunk
        self.fetch_plans = 0                                 # plans the policy made (one per layer that predicts)
        self.reads_ahead_by_depth = collections.Counter()    # speculative reads by MoE layers ahead (0 = the next)
        self.max_reads_pending = 0                           # most speculative disk reads in flight after a plan
        self.batch_sizes: list[int] = []                     # padded rows of each decode batch size met (dynamic)
        self._warmed: set[int] = set()                       # decode batch sizes whose executables are compiled
        self._warming = self._warm_split = False            # in warmup(): no predictions; force chunked experts
        self._warm_split_done: set[tuple] = set()           # step shapes whose chunked expert path warmup compiled
        weights = {"embed": None, "final_norm": head["final_norm"], "lm_head": head["lm_head"], "layers": []}
        # The KV pool takes what the compute pool holds, up to max_batch_size requests of the full context
        page_bytes = PAGE_TOKENS * mb.kv_bytes_per_token
        per_request = -(-context // PAGE_TOKENS)
        pages = min(self.mm.free("compute") // page_bytes, mc.max_batch_size * per_request)
        super().__init__(cfg, weights, tokenizer, prefill_form=prefill_form, name=name, dtype=dt,
                         enable_fusion=cc.enable_fusion, max_batch_size=mc.max_batch_size,
                         min_batch_size=mc.min_batch_size, dynamic_batch=mc.dynamic_batch, max_context=context,
                         step_tokens=mc.step_tokens, kv_pages=int(pages), device=self.device, mm=self.mm,
                         compile_ahead=cc.compile_ahead)
        self.preloaded = {"host": 0, "gpu": 0, "seconds": 0.0}
        if self.hot:
            self._load_hot()
        if mc.preload_experts and self.experts is not None:
            self._preload()

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        self.metrics.phase = phase

    def _embed(self, tokens: np.ndarray) -> jax.Array:
        return jax.device_put(self._embed_table[np.asarray(tokens)], shardings(self.device)[0])

    def _next_moe(self, i: int, depth: int) -> list[int]:
        return [j for j in self.moe_layers if j > i][:depth]

    def _preload(self, chunk: int = 32) -> None:
        """preload_experts: read the same share of every MoE layer's experts from disk at load (as many as the host
        cache holds, at least as many as the GPU slots hold), in batched reads on the loader threads, and copy the
        first of them into the GPU expert slots, so the first tokens meet the steady state instead of the disk. With
        popularity the most popular go first (else the lowest ids); the hot set, already on the GPU, is skipped."""
        t0 = time.perf_counter()
        self._set_phase("load")
        moe, E = len(self.moe_layers), self.config.n_routed_experts
        order = {i: [int(e) for e in popularity_order(self.popularity, i, E) if not self.hot or e not in self.hot[i]]
                 for i in self.moe_layers}
        hosted = gpu_loaded = 0
        for d, mv in enumerate(self.movers):               # each device fills its own caches with its own experts
            mine = {i: [e for e in order[i] if self.owner[i][e] == d] for i in self.moe_layers}
            share = max(len(v) for v in mine.values())
            per_host = min(share, mv.host_cache.slots.capacity // moe)
            per_gpu = min(share, (mv.experts.slots.capacity - len(mv.experts.hot)) // moe)
            n = max(per_host, per_gpu)
            reads = [(i, self.disk.read(i, sorted(mine[i][c:min(n, c + chunk)]), stage=mv.host_cache.put))
                     for i in self.moe_layers for c in range(0, n, chunk) if mine[i][c:min(n, c + chunk)]]
            gpu = {(i, e) for i in self.moe_layers for e in mine[i][:per_gpu]}
            rows: dict[tuple[int, int], Any] = {}
            for i, f in reads:
                rows.update({(i, e): r for e, r in f.result().items() if (i, e) in gpu})
            for i in self.moe_layers:
                mv.experts.load([((i, e), rows.pop((i, e))) for e in mine[i][:per_gpu]])
            jax.block_until_ready(mv.experts.flush())
            hosted += sum(min(per_host, len(v)) for v in mine.values())
            gpu_loaded += sum(min(per_gpu, len(v)) for v in mine.values())
        self.preloaded = {"host": hosted, "gpu": gpu_loaded, "seconds": time.perf_counter() - t0}
        self._set_phase("prefill")

    def _load_hot(self) -> None:
        """Read the hot set (memory_config.hot_experts) from disk and copy it into GPU slots pinned for the engine's
        life: at load, and again after a failed step consumed the slot pool. It bypasses the host cache (a pinned
        expert never needs its host copy again): the host cache's room goes to the experts after it."""
        t0, phase = time.perf_counter(), self.metrics.phase
        self._set_phase("load")
        try:
            reads = [(d, i, self.disk.read(i, mine)) for i, experts in self.hot.items()
                     for d, mine in self._by_device(i, experts)]
            for d, mv in enumerate(self.movers):            # each device's share of the hot set, in its own slots
                mv.experts.load_hot([((i, e), row) for d_, i, f in reads if d_ == d for e, row in f.result().items()])
            jax.block_until_ready([mv.experts.pool for mv in self.movers])
        finally:
            self._set_phase(phase)
        self._hot_loaded = True
        self.hot_counters["loads"] += 1
        self.hot_counters["seconds"] += time.perf_counter() - t0

    def _hot_report(self) -> dict[str, Any]:
        """stats()["hot_experts"]: the hot set's size, bytes and how much of the routing it served."""
        mc, c = self.runtime.memory_config, self.hot_counters
        out: dict[str, Any] = {"per_layer": mc.hot_experts if self.hot else 0, "popularity": self.popularity_source}
        if mc.hot_experts and not self.hot:
            out["note"] = "every routed expert is resident on the GPU: no hot set needed" if self.full_experts \
                else "no routed experts"
        if not self.hot:
            return out
        keys = [(i, e) for i, ex in self.hot.items() for e in ex]
        out.update({"experts": len(keys), "bytes": len(keys) * self.experts.expert_bytes,
                    "resident": int(sum(self._mover(*k).experts.lookup(k, count=False) is not None for k in keys)),
                    "layers": {str(i): ex for i, ex in self.hot.items()}, **c,
                    # of the (layer, expert) uses of the MoE layers' steps, those the hot set served (no copy)
                    "hit_rate": c["hits"] / c["uses"] if c["uses"] else None,
                    "assignment_share": c["assignments_hot"] / c["assignments"] if c["assignments"] else None})
        return out

    # ---- the layer loop ------------------------------------------------------------------------------------------
    def _forward(self, groups: list[Group], caches: list[dict]) -> list[jax.Array]:
        """One pass over the layers for a step's groups: each group's attention on its own shape, then one expert half
        for all their tokens together (merged when there are several), so the experts a step needs move once."""
        cfg = self.config
        overlap = self.runtime.compute_config.overlap_io
        if self.hot and not self._hot_loaded:             # a failed step consumed the slot pool: load it again
            self._load_hot()
        self._step_start = (time.perf_counter(), self.metrics.link_bytes.get("host->GPU", 0))
        s_dev = shardings(self.device)[0]
        # every group's inputs in one transfer call: embedded tokens, positions, page tables, valid masks
        host = [(self._embed_table[g.tokens], g.positions, g.pages, g.valid) for g in groups]
        xs, pos, pages, valid = (list(t) for t in zip(*jax.device_put(host, s_dev)))
        valid_flat = np.concatenate([g.valid.reshape(-1) for g in groups])
        # decode rows of a decode-only step (the policy's copy-ahead trial compares such steps); 0 otherwise
        self._step_rows = int(valid_flat.sum()) if all(g.tokens.shape[1] == 1 for g in groups) else 0
        self._cpu_step = self.cpu_path is not None and self.policy.cpu_allowed(self._step_rows)
        routed = {}                                      # MoE layers whose experts all sit on the GPU: routing ids
        shapes = tuple(g.tokens.shape for g in groups)
        # call sites noted this step (compile ahead, the warm-up's compile pool; None: neither)
        noted: set | None = set() if self._ahead() is not None else None
        for i in range(cfg.num_hidden_layers):
            t0 = time.perf_counter()
            kind = cfg.layer_kind(i)
            m = self.metrics
            with m.host("layer_weights"):
                w = self.layers.get(i)
            if overlap:
                with m.host("prefetch"):
                    for j in range(i + 1, min(i + 1 + self.policy.depth, cfg.num_hidden_layers)):
                        self.layers.prefetch(j)
            # The attention call predicts for as many MoE layers as the schedule may ever look ahead, whatever the
            # current depth and however few MoE layers follow (the tuple is padded with repeats whose rows are never
            # read), so attention compiles once per layer kind and form; _prefetch uses the first `depth` rows.
            ahead = self._next_moe(i, self.policy.max_depth) if (overlap and self.experts is not None) else []
            # no plan at all (no prediction read back, no policy call) while the policy copies nothing ahead and no
            # expert can be on disk: the trial's steps without copies ahead then cost what loading on demand costs
            nxt = ahead[:self.policy.lookahead()] if (self.policy.copies_ahead or self._reads_possible) else []
            if self._warming:                                # padding rows: their predictions mean nothing
                nxt = []
            routers = tuple(self.routers[j] for j in ahead)
            if overlap and self.experts is not None:
                routers += (self.routers[self.moe_layers[-1]],) * (self.policy.max_depth - len(routers))
            outs = []
            with m.host("dispatch"):
                for k, g in enumerate(groups):
                    if noted is not None and (kind, k) not in noted:   # once per kind and group
                        noted.add((kind, k))
                        self._note_call(
                            ("attn", kind, g.form, len(routers)),
                            lambda w_, x_, c_, p_, v_, r_, pages, kind=kind, form=g.form: self.sched.attn.lower(
                                w_, x_, c_, p_, pages, v_, r_, kind=kind, form=form),
                            (w, xs[k], caches[i], pos[k], valid[k], routers), (1, 3, 4), pages[k])
                    h, hn, caches[i], idx, weight, pred, shared = self.sched.attn(
                        w, xs[k], caches[i], pos[k], pages[k], valid[k], routers, kind=kind, form=g.form)
                    outs.append((h, hn, idx, weight, pred, shared))
            preds = [o[4] for o in outs if o[4] is not None]
            if kind != "moe":
                with m.host("dispatch"):
                    xs = [self.sched.dense(w, o[0], o[1]) for o in outs]
                if preds and len(nxt):
                    with m.host("prefetch"):
                        self._prefetch(_merge_predictions(preds), nxt)
            else:
                if len(groups) == 1:
                    h, hn, idx, weight, _, shared = outs[0]
                else:
                    with m.host("dispatch"):
                        parts = (tuple(o[j] for o in outs) for j in (0, 1, 2, 3, 5))
                        h, hn, idx, weight, shared = self.sched.merge(*parts)
                if self.full_experts:
                    with m.host("dispatch"):
                        rows = self.sched.rows_direct(hn, idx, self.full_experts[i])
                        x = self.sched.moe_out(w, h, hn, rows, weight, shared)
                        routed[i] = idx
                else:
                    idx.copy_to_host_async()         # start the routing's device->host copy as soon as it exists,
                    for p_ in (preds if nxt else ()):   # so the sync below waits for one copy, not a round trip
                        p_.copy_to_host_async()
                    if self._cpu_step and hn.shape[0] * hn.shape[1] <= CPU_MAX_ROWS:
                        hn.copy_to_host_async()       # the CPU experts' input, beside the routing
                    x = self._moe_tiered(i, w, h, hn, idx, weight, shared, preds, nxt, valid_flat)
                if len(groups) == 1:
                    xs = [x]
                else:
                    with m.host("dispatch"):
                        xs = list(self.sched.split(x, shapes=shapes))
            self.layers.release(i)
            self.metrics.add_layer(i, time.perf_counter() - t0)
        if self.experts is not None:
            self._release_prefetch_pins()                 # a step's predictions never outlive it
            self._pending.clear()                         # nor its disk reads (each layer dropped its own)
            self._copied_ahead.clear()
            for mv in self.movers:
                mv.experts.tick()
                mv.host_cache.tick()
        self.metrics.tokens += 1
        self._count_activations(routed, valid_flat)
        return [self._logits_of(x, g) for x, g in zip(xs, groups)]

    def _moe_tiered(self, i, w, h, hn, idx, weight, shared, preds, nxt, valid):
        m = self.metrics
        with m.host("routing_sync"):
            ids = np.asarray(idx)                                        # the one sync of this layer
        real = ids[valid]                                                # padding tokens route nowhere
        routed = set(real.reshape(-1).tolist())
        used = sorted(routed)
        self.metrics.add_activations(i, real.reshape(-1))
        if i in self._predicted:
            self.metrics.add_prediction(self._predicted.pop(i), routed)
        self._release_prefetch_pins(i, routed)
        B, T, D = hn.shape
        cpu_job = None
        if self._cpu_step and B * T <= CPU_MAX_ROWS:
            with m.host("cpu_experts"):
                cpu_job = self._start_cpu_experts(i, hn, ids, valid, used)
            if cpu_job is not None:                   # their assignments get slot P: zero rows on the GPU
                used = [e for e in used if e not in cpu_job.experts]
        hot_used: list[int] = []
        if self.hot:                                  # resident and pinned: no slot to find, no copy; first chunk
            hot = self._hot_rows[i] & self._gpu_resident(i)
            hot_used = [e for e in used if hot[e]]
            used = [e for e in used if not hot[e]]
            self._count_hot(i, real, len(hot_used), len(routed))
        pred = preds if (preds and len(nxt)) else None
        if len(self.movers) == 1:
            # with no CPU rows to add, a layer whose experts fit the slots at once runs rows + combine in one call
            finish = (w, h, weight, shared) if cpu_job is None else None
            (acc, combined), _ = self._rows_on(self.movers[0], i, hn, ids, valid, used, hot_used, None, pred, nxt,
                                               finish)
            if combined:                          # acc is the layer's output
                self._drop_pending(i)
                return acc
        else:
            # Every device computes the rows of the experts it owns (its copies over its own link); the others' rows
            # are merged into the first device's by assignment mask: each assignment's row comes from exactly one
            # device, bit for bit. Every device's disk reads start first, so no device's reads wait behind another
            # device's copies and compute being issued.
            owner = self.owner[i]
            tiers = self._tiers(i)
            self._start_disk(i, [e for e in used if tiers[e] == DISK])
            parts = []
            for d, mv in enumerate(self.movers):
                mine, hot_mine = [e for e in used if owner[e] == d], [e for e in hot_used if owner[e] == d]
                if d and not (mine or hot_mine):
                    continue
                with m.host("dispatch"):
                    x = hn if d == 0 else jax.device_put(hn, mv.s_dev)
                (acc_d, _), pred = self._rows_on(mv, i, x, ids, valid, mine, hot_mine, None, pred, nxt)
                parts.append((d, acc_d))
            acc = parts[0][1]
            s_dev = shardings(self.device)[0]
            for d, rows in parts[1:]:
                with m.host("dispatch"):
                    acc = take_rows(acc, jax.device_put(rows, s_dev), jax.device_put(owner[ids] == d, s_dev))
        self._drop_pending(i)
        if cpu_job is not None:
            acc = self._finish_cpu_experts(i, cpu_job, acc)
        with m.host("dispatch"):
            return self.sched.moe_out(w, h, hn, acc, weight, shared)

    def _rows_on(self, mv: ExpertMovers, i: int, hn, ids: np.ndarray, valid: np.ndarray, used: list[int],
                 hot_used: list[int], acc, pred, nxt: list[int], finish: tuple | None = None):
        """Rows of layer i's assignments to `used` (and the resident hot experts `hot_used`) on one device's slots, in
        chunks of the slots free there, added to `acc` (None: from zeros); the first chunk's experts secured, the
        predictions `pred` (None: none) go to _prefetch. With `finish` (w, h, weight, shared) and one chunk, the
        combine runs in the same call. Returns ((acc, or the layer's output when combined; combined?), pred left)."""
        m = self.metrics
        P = mv.experts.slots.capacity
        overlap_compute = self.runtime.compute_config.overlap_compute
        room = P - len(mv.experts.hot)                  # slots the other experts may take
        chunks = self.policy.chunks(used, room, overlap_compute) or [[]]    # [[]]: every expert on the CPU / hot
        if self._warm_split and len(chunks) == 1:       # warmup: the path of experts that do not fit at once
            chunks.append([])
        chunks[0] = hot_used + chunks[0]
        if overlap_compute and len(chunks) > 1:                          # read later chunks while earlier compute
            tiers = self._tiers(i)
            for ch in chunks[1:]:
                ahead = [e for e in ch if tiers[e] == DISK]
                self.chunk_reads_ahead += len(ahead)
                self._start_disk(i, ahead)
        lut = np.full(self.config.n_routed_experts, P, np.int32)          # P: not in this chunk
        combined = finish is not None and acc is None and len(chunks) == 1
        if acc is None and not combined:                                 # committed, as later chunks; one dispatch
            B, T, D = hn.shape
            acc = _zeros((B * T, ids.shape[1], D), hn.dtype, mv.device)
        for ch in chunks:
            with m.host("expert_copies"):                                # includes waits for disk (stall_seconds)
                lut[ch] = self._ensure(i, ch, mv)
                pool = mv.experts.flush()
            slot_ids = lut[ids]
            slot_ids[~valid] = P
            with m.host("dispatch"):
                acc = self.sched.moe_rows_out(pool, slot_ids, hn, *finish) if combined else \
                    self.sched.moe_rows(pool, slot_ids, hn, acc)
            lut[ch] = P
            if pred is not None:                                # after this layer's experts are secured
                with m.host("prefetch"):
                    self._prefetch(_merge_predictions(pred), nxt)
                pred = None
            mv.experts.slots.unpin_all([(i, e) for e in ch])
        return (acc, combined), pred

    def _count_hot(self, i: int, real: np.ndarray, hits: int, uses: int) -> None:
        """The hot set's share of layer i's step: experts used (distinct) and token-expert assignments."""
        c = self.hot_counters
        c["hits"] += hits
        c["uses"] += uses
        c["assignments"] += real.size
        c["assignments_hot"] += int(self._hot_rows[i][real].sum())

    def _start_cpu_experts(self, i: int, hn, ids: np.ndarray, valid: np.ndarray, used: list[int]):
        """The CPU path's job for layer i: the policy's pick of the routed experts that miss the GPU but sit in the
        host cache, started on the worker thread; None when it picks none."""
        tiers = self._tiers(i)
        missing = [e for e in used if tiers[e] != GPU]
        host_missing = [e for e in missing if tiers[e] == HOST]
        if not host_missing:
            return None
        chosen = self.cpu_path.choose(host_missing, ids, valid, self.links.h2d, len(missing) - len(host_missing))
        # The pinned buffers, held by the job until the kernel returns: a loader thread that evicts one meanwhile
        # drops only the cache's reference. One evicted since the tiers were read is copied instead.
        got = [(e, self.host_cache.get((i, e))) for e in chosen]
        got = [(e, b) for e, b in got if b is not None]
        if not got:
            return None
        for e, _ in got:
            self.experts.lookup((i, e))                   # a GPU miss all the same (the GPU tier's hit rate)
        x = np.asarray(hn).reshape(ids.shape[0], -1)      # its device->host copy started with the routing's
        return self.cpu_path.start(x, [b for _, b in got], [e for e, _ in got], ids, valid)

    def _finish_cpu_experts(self, i: int, job, acc: jax.Array) -> jax.Array:
        """The CPU's rows in `acc` where their assignments are (the GPU left zeros there), so the combine that
        follows is the one every expert path ends in."""
        m = self.metrics
        with m.host("cpu_experts_wait"):
            y, mask = self.cpu_path.finish(i, job)
        with m.host("dispatch"):
            s_dev = shardings(self.device)[0]
            t0 = time.perf_counter()
            rows = jax.device_put(y, s_dev)
            m.add_transfer("cpu->GPU", y.nbytes, time.perf_counter() - t0, issued_only=True)
            return take_rows(acc, rows, jax.device_put(mask, s_dev))

    def _drop_pending(self, i: int) -> None:
        """Forget layer i's disk reads once it has run. A read not consumed (a prediction the routing did not use)
        kept its future, and with it the pinned buffers of every expert read in the same batch, for the rest of the
        run: on the H200 the cold batch-8 process was SIGKILLed (run 5), and a CPU probe held 2.8x the store's
        expert bytes in such futures after two generations."""
        for k in [k for k in self._pending if k[0] == i]:
            del self._pending[k]

    def _tiers(self, i: int) -> np.ndarray:
        """Where each expert of layer i sits now ([E]: GPU / HOST / DISK / READING), from the caches' residency rows
        (vectorised: no per-expert lookups)."""
        E = self.config.n_routed_experts
        t = np.full(E, DISK, np.int8)
        t[self._resident_on(i, "host_cache")] = HOST
        reading = [e for (j, e) in self._pending if j == i]
        t[reading] = READING
        t[self._gpu_resident(i)] = GPU
        return t

    def _resident_on(self, i: int, cache: str) -> np.ndarray:
        """[E] bool: experts of layer i that their own device's `cache` ("experts" or "host_cache") holds."""
        E = self.config.n_routed_experts
        if len(self.movers) == 1:
            return getattr(self.movers[0], cache).resident(i, E)
        out = np.zeros(E, bool)
        for d, mv in enumerate(self.movers):
            out |= getattr(mv, cache).resident(i, E) & (self.owner[i] == d)
        return out

    def _gpu_resident(self, i: int) -> np.ndarray:
        return self._resident_on(i, "experts")

    def _mover(self, i: int, e: int) -> ExpertMovers:
        """The movers of the device that owns expert e of layer i."""
        return self.movers[int(self.owner[i][e])]

    def _by_device(self, i: int, experts) -> list[tuple[int, list[int]]]:
        """`experts` of layer i grouped by the index (in self.movers) of the device that owns them (devices with none
        left out), order kept."""
        if len(self.movers) == 1:
            return [(0, list(experts))] if len(experts) else []
        owner = self.owner[i]
        groups = [(d, [e for e in experts if owner[e] == d]) for d in range(len(self.movers))]
        return [(d, g) for d, g in groups if g]

    def _start_disk(self, i: int, experts: list[int]) -> None:
        """Read `experts` of layer i from disk on a loader thread (staged into pinned memory), in order."""
        todo = [e for e in experts if (i, e) not in self._pending]
        for d, mine in self._by_device(i, todo):        # staged into the pinned memory of the expert's device
            fut = self.disk.read(i, mine, stage=self.movers[d].host_cache.put)
            for e in mine:
                self._pending[(i, e)] = fut

    def _host_row(self, i: int, e: int):
        """Expert (i, e)'s buffer in pinned host memory (waiting for its disk read if needed)."""
        got = self._mover(i, e).host_cache.get((i, e))
        if got is not None:
            return got
        if (i, e) not in self._pending:
            self._start_disk(i, [e])
        t0 = time.perf_counter()
        fut = self._pending.pop((i, e))
        if not fut.done():
            self.disk_waits += 1
        row = fut.result()[e]                                         # staged in pinned memory by the loader
        self.metrics.add_stall(time.perf_counter() - t0)
        return row

    def _ensure(self, i: int, experts: list[int], mv: ExpertMovers) -> list[int]:
        """GPU slots of `experts` of layer i (all owned by `mv`'s device), loading misses in one batch; they stay
        pinned until unpinned."""
        slots: dict[int, int] = {}
        misses = []
        for e in experts:
            slot = mv.experts.lookup((i, e))
            if slot is None:
                misses.append(e)
            else:
                mv.experts.slots.pin((i, e))
                slots[e] = slot
        self._start_disk(i, [e for e in misses if mv.host_cache.get((i, e), count=False) is None])
        self.metrics.add_recopied(sum((i, e) in self._copied_ahead for e in misses))
        rows = [((i, e), self._host_row(i, e)) for e in misses]
        loaded = (mv.experts.write_now if self._copy_in_write else mv.experts.load)(rows, pin=True)
        slots.update(zip(misses, loaded))
        return [slots[e] for e in experts]

    def _prefetch(self, pred: np.ndarray, nxt: list[int]) -> None:
        """The policy decides from the predictions and the caches' state; the movers execute its plan: disk->host
        reads for the layers it names, host->GPU copies for the next MoE layer, pinned until that layer runs
        (unpinned, a just-copied expert is LRFU's first victim: a CPU probe lost 54% of the predicted copies at batch
        8 to the next copies while precision was 0.92)."""
        where = {j: self._tiers(j) for j in nxt}
        rooms = [mv.experts.slots.capacity - mv.experts.slots.pinned_count() for mv in self.movers]
        copy_room = sum(rooms)
        read_room = self.placement.pools.host_prefetch // max(self.host_cache.expert_bytes, 1) - len(self._pending)
        plan = self.policy.plan(pred, nxt, where, copy_room=copy_room, read_room=read_room)
        self._predicted.update(plan.predicted)
        self.fetch_plans += 1
        for j, experts in plan.reads.items():
            self._start_disk(j, list(experts))
            self.reads_ahead_by_depth[nxt.index(j)] += len(experts)
        ahead = sum(k[0] >= nxt[0] for k in self._pending)               # speculative reads in flight
        self.max_reads_pending = max(self.max_reads_pending, ahead)
        for j, experts in plan.copies.items():
            for d, mine in self._by_device(j, experts):    # each device's copies over its own link, within its room
                mv = self.movers[d]
                up = [((j, e), mv.host_cache.get((j, e), count=False)) for e in mine]
                up = [(k, t) for k, t in up if t is not None][:max(rooms[d], 0)]   # evicted since by a loader thread
                rooms[d] -= len(up)
                mv.experts.load(up, pin=True)
                self._prefetch_pins.setdefault(j, []).extend(k for k, _ in up)
                self._copied_ahead.update(k for k, _ in up)

    def _release_prefetch_pins(self, layer: int | None = None, used: set | None = None) -> None:
        """Unpin the experts prefetched for `layer` (every layer's when None) as it starts; with `used`, count which
        of them it used (the prefetch hit rate)."""
        for j in ([layer] if layer is not None else list(self._prefetch_pins)):
            keys = self._prefetch_pins.pop(j, [])
            if used is not None:
                hit = sum(e in used for _, e in keys)
                self.metrics.add_prefetch(hit, len(keys) - hit)
            for d, mine in self._by_device(j, [e for _, e in keys]):
                self.movers[d].experts.slots.unpin_all([(j, e) for e in mine])

    def _after_step(self) -> None:
        if self.experts is not None:
            self._adapt()

    def _adapt(self) -> None:
        """Once per step, after its tokens were read back: tell the policy what the step saw (prediction counts, disk
        waits, how busy the host->GPU link was against the engine's link ceiling, measured at load under auto_tune).
        The step's time runs to that read-back, so it includes all its device work: timed at the end of the layer loop
        (session 12) it left out what runs after the last routing sync (the last experts, the head, sampling), and on
        the H200 the trial's steps (27-31 ms, one of 49) did not match the generation's 34 ms per token
        (bench/RESULTS.md, run 5)."""
        m = self.metrics
        t0, b0 = self._step_start
        seconds = time.perf_counter() - t0
        moved = m.link_bytes.get("host->GPU", 0) - b0
        busy = moved / max(self.links.h2d * seconds, 1e-9)
        rows = self._step_rows
        cpu = self._cpu_step if (self.cpu_path is not None and rows <= CPU_MAX_ROWS) else None
        sample = StepSample(rows, seconds, moved, len(self.moe_layers), cpu) if rows else None
        self.policy.end_step(tp=m.pred_tp, fp=m.pred_fp, fn=m.pred_fn,
                             disk_waited=self.disk_waits > self._disk_waits_seen, link_busy=busy, step=sample)
        self._disk_waits_seen = self.disk_waits

    def _warm_forward(self, groups: list[Group]) -> list[list[jax.Array]]:
        """A warm-up step both ways a tiered step may run a layer's experts: in one call with the combine (they fit
        the free slots at once), then in chunks and the combine apart (they do not: prompt chunks, large batches)."""
        outs = []
        rows = tuple(g.tokens.shape for g in groups)         # the expert programs' shapes (not the page widths)
        self._warming = True
        try:
            for split in (False, True) if rows not in self._warm_split_done else (False,):
                self._warm_split = split
                outs.append(self._forward(groups, self.kv.caches))
            self._warm_split_done.add(rows)
        finally:
            self._warming = self._warm_split = False
        return outs

    def _prepare_decode(self, B: int) -> None:
        """Compile, once per decode batch size, the expert-rows call (run on dummy inputs), and once every bucket of
        the slot write (one per copy-count bucket; compiled ahead, not run), so no compile lands inside a decode step:
        which write bucket a step needs depends on how many experts it copies."""
        if self.experts is None or B in self._warmed:
            return
        self._set_phase("prefill")                           # counted with the generation's start, not a decode
        cfg = self.config
        K, D = cfg.num_experts_per_tok, cfg.hidden_size
        with self.metrics.host("warmup"):
            s_dev = shardings(self.device)[0]   # committed inputs, like attention's outputs: the same executable
            for d, mv in enumerate(self.movers):    # each device's executables (its pool's slot count)
                hn = jnp.zeros((B, 1, D), self.dtype, device=mv.s_dev)
                rows = self.sched.moe_rows(mv.experts.flush(), np.full((B, K), mv.experts.slots.capacity, np.int32),
                                           hn, _zeros((B, K, D), self.dtype, mv.device))  # also the steps' zeros
                if d == 0:
                    acc = rows
                else:                                           # the merge of its rows into the first device's
                    acc = take_rows(acc, jax.device_put(rows, s_dev), jax.device_put(np.zeros((B, K), bool), s_dev))
                if not self._warmed:
                    mv.experts.compile_writes(self._copy_in_write)
            if self.cpu_path and B <= CPU_MAX_ROWS:             # the CPU rows' merge
                acc = take_rows(acc, jax.device_put(np.zeros((B, K, D), np.float32), s_dev),
                                     jax.device_put(np.zeros((B, K), bool), s_dev))
            jax.block_until_ready(acc)
        self._warmed.add(B)
        self.batch_sizes.append(B)

    def _recover(self) -> None:
        """After a failed step: nothing stays pinned or pending, no layer stays in the ring, and an expert pool that
        a failed call consumed is rebuilt empty (the caches lose their contents, never their consistency)."""
        self.layers.release_all()
        if self.experts is not None:
            self._prefetch_pins.clear()
            self._predicted.clear()
            self._pending.clear()
            kept = [mv.experts.recover() for mv in self.movers]
            if not all(kept):                             # the hot set went with a pool: next step reloads it
                self._hot_loaded = False

    # ---- monitoring -----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Generation counters plus the runtime's: memory per pool, bytes and GB/s per link against the ceilings,
        per-layer latency, stall time, hit rates per tier, prediction precision/recall, expert activations, the
        request engine's requests, steps and KV pool. Read on the engine thread (between steps)."""
        return self._call(self._stats_now)

    def _stats_now(self) -> dict[str, Any]:
        hit = {}
        if self.experts is not None:                     # over every device's caches
            for tier, cache in (("gpu", "experts"), ("host", "host_cache")):
                c = [getattr(mv, cache).slots.counters for mv in self.movers]
                hits, n = sum(x.hits for x in c), sum(x.hits + x.misses for x in c)
                hit[tier] = hits / n if n else 0.0
        p = self.placement
        extra = {
            "generation": dict(self._stats),
            "routing": routing_report(self.config),
            "requests": self.requests_status(),
            "steps": self._step_counters(),
            "pools": self.mm.report(),
            "hit_rates": hit,
            "layers": {"resident": len(p.resident_layers), "ring_slots": p.ring_slots, **self.layers.counters,
                       "max_inflight": self.layers.max_inflight},
            "ceilings_GB_per_s": {"host->GPU": self.links.h2d / 1e9, "disk->host": self.links.disk / 1e9,
                                  "measured": self.links.measured},
            "predicted_tok_s": p.tokens_per_s,
            "expert_threshold": self.policy.threshold,
            "prefetch_depth": self.policy.depth,
            "disk_prefetch_depth": self.policy.disk_depth,
            "disk_waits": self.disk_waits,
            "copies_ahead": self.policy.copies_ahead,                # predicted host->GPU copies on (adaptive)
            "steps_without_copies_ahead": self.policy.steps_without_copies_ahead,   # by the link gate or the trial
            "steps_link_full": self.policy.steps_link_full,                       # by the link gate
            "copy_ahead_trial": self.policy.trial(),                  # per decode bucket: ms with / without, verdict
            "copy_ahead_samples": self.policy.trial_samples(),        # the trial's last steps (not a gauge)
            "copy_ahead_limit": self.policy.ahead_limit,
            "fetch_plans": self.fetch_plans,
            "disk_reads_pending": len(self._pending),
            "disk_reads_pending_max": self.max_reads_pending,
            "reads_ahead_by_depth": dict(self.reads_ahead_by_depth),
            "preloaded_experts": self.preloaded,
            "hot_experts": self._hot_report(),
            "expert_copy": {"mode": self.runtime.compute_config.expert_copy,      # demand copies: put or in the write
                            "in_write": self.experts.copied_in_write if self.experts is not None else 0},
            "cpu_experts": {"enabled": int(self.cpu_path is not None), "mode": self.runtime.compute_config.cpu_experts,
                            "reason": self.cpu_experts_reason, **(self.cpu_path.stats() if self.cpu_path else
                                                                  {"experts": 0, "bytes": 0, "seconds": 0.0}),
                            # under auto: per decode bucket, median step ms with and without the path, the verdict
                            "trial": self.policy.cpu_trial_report(),
                            "trial_steps": {"with": self.policy.cpu_trial_steps[True],
                                            "without": self.policy.cpu_trial_steps[False]}},
            "process_memory": process_memory(),
            "expert_devices": self._devices_report(),
        }
        snap = self.metrics.snapshot(extra)
        for i, counts in enumerate(self._activations()):       # layers whose experts all sit on the GPU
            if any(counts):
                snap["expert_activations"][i] = counts
        return snap

    def _devices_report(self) -> dict[str, Any]:
        """stats()["expert_devices"]: per device (tiered expert parallelism) its experts, caches, hit rates, pools and
        bytes over its own host->GPU link; the first device also runs everything else."""
        per = []
        for d, mv in enumerate(self.movers):
            g, h = mv.experts.slots.counters, mv.host_cache.slots.counters
            per.append({"device": str(mv.device),
                        "experts": int(sum(int((o == d).sum()) for o in self.owner.values())),
                        "gpu_slots": mv.experts.slots.capacity, "host_slots": mv.host_cache.slots.capacity,
                        "gpu_hit_rate": g.hit_rate, "host_hit_rate": h.hit_rate,
                        "gpu_hits": g.hits, "gpu_misses": g.misses,
                        "bytes": dict(mv.link.bytes), "copies": dict(mv.link.count),
                        "pools": {k: v for k, v in mv.mm.report().items() if v["capacity"]}})
        out: dict[str, Any] = {"count": max(len(self.movers), 1), "per_device": per}
        if self.devices_reason:
            out["note"] = self.devices_reason
        return out

    def stats_prometheus(self) -> str:
        return prometheus_text(self.stats())

    def stats_json_line(self) -> str:
        return json_line(self.stats())

    def close(self) -> None:
        super().close()
        if self.disk is not None:
            self.disk.close()
        if self.cpu_path is not None:
            self.cpu_path.close()


@functools.lru_cache(maxsize=64)
def _zeros_fn(shape: tuple, dtype, device) -> Any:
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=shardings(device)[0])


def _zeros(shape: tuple, dtype, device) -> jax.Array:
    """A fresh zero array on the device through one cached executable (an eager jnp.zeros is several dispatches:
    ~170 us against ~8 us on the CPU machine; once per MoE layer per token)."""
    return _zeros_fn(tuple(shape), jnp.dtype(dtype), device)()


def _merge_predictions(preds: list) -> np.ndarray:
    """The groups' predictions [depth, E] as one (the largest probability per expert): host arrays."""
    arrays = [np.asarray(p) for p in preds]
    return arrays[0] if len(arrays) == 1 else np.maximum.reduce(arrays)


def _model_bytes(store, runtime: RuntimeConfig, dtype) -> tuple:
    """(the config with memory_config.active_experts' top-k, the planner's byte counts at that k)."""
    cfg = active_experts_config(store.config, runtime.memory_config.active_experts)
    return cfg, model_bytes_from_store(store, dtype).with_top_k(cfg.num_experts_per_tok or 0)


def _plan_args(cfg, runtime: RuntimeConfig, mb: ModelBytes) -> tuple[int, int, int, dict]:
    """(GPU budget, host budget, the context a request may hold, plan()'s other keyword arguments but links) for a
    runtime config. A budget of None is "no limit" (UNLIMITED); 0 is a budget of zero bytes (the planner says it is
    too small and names the minimum)."""
    mc, cc = runtime.memory_config, runtime.compute_config
    gpu = UNLIMITED if runtime.gpu_memory is None else runtime.gpu_memory
    host = UNLIMITED if runtime.host_memory is None else runtime.host_memory
    context = _context(cfg, mc.max_context, Pools.split(gpu, host).compute, mb.kv_bytes_per_token)
    return gpu, host, context, dict(max_gpu_layers=mc.max_gpu_layers, prefetch_layers=mc.prefetch_layers,
                                    overlap_io=cc.overlap_io, context_tokens=context, step_tokens=mc.step_tokens)


def planned_pinned_bytes(store, runtime: RuntimeConfig, dtype) -> int:
    """The host bytes a one-device TieredEngine of this store and runtime config pins at most at once (its plan's
    pinned_host_peak: caches and disk reads in flight), computed without touching a device: dsjax.load caps JAX's
    pinned pool from it before the GPU client starts (memory.cap_pinned_host). Links do not move the placement, so
    the default ones plan it."""
    cfg, mb = _model_bytes(store, runtime, dtype)
    gpu, host, _, plan_kw = _plan_args(cfg, runtime, mb)
    return plan(mb, gpu, host, links=Links(), **plan_kw).pinned_host_peak(mb)


def _context(cfg, max_context: int, compute_pool: int, kv_per_token: int) -> int:
    """The context a request may hold: memory_config.max_context, or (0) the model's, at most 4096, and at most what
    the compute pool's KV pages hold (at least one page: a smaller pool is the planner's "too small")."""
    if max_context:
        if max_context > cfg.max_position_embeddings:
            raise BudgetError(f"memory_config.max_context={max_context} exceeds the model's max_position_embeddings="
                              f"{cfg.max_position_embeddings}")
        return max_context
    fits = compute_pool // max(kv_per_token, 1) // PAGE_TOKENS * PAGE_TOKENS
    return max(min(cfg.max_position_embeddings, DEFAULT_CONTEXT, fits), min(PAGE_TOKENS, cfg.max_position_embeddings))


def measure_links(store, device=None, nbytes: int = 64 << 20) -> Links:
    """auto_tune: time a pinned host->device copy and a read of a few experts from the store."""
    s_dev, s_host = shardings(device)
    host = jax.device_put(np.ones(nbytes // 4, np.float32), s_host)
    jax.block_until_ready(jax.device_put(host, s_dev))
    t0 = time.perf_counter()
    jax.block_until_ready(jax.device_put(host, s_dev))
    h2d = nbytes / max(time.perf_counter() - t0, 1e-9)
    cfg = store.config
    first = _first_moe(cfg)
    disk = Links().disk
    if first >= 0:
        t0 = time.perf_counter()
        futs = store.read_experts(first, range(min(8, cfg.n_routed_experts)))
        got = sum(tree_nbytes(f.result()) for f in futs.values())
        disk = got / max(time.perf_counter() - t0, 1e-9)
    return Links(h2d=h2d, disk=disk, measured=True)


# ---- tiered expert parallelism (issue 22): one set of expert movers per device ----------------------------------------

class DeviceLink:
    """The engine's Metrics as one device's movers see them: every transfer counts in the engine's totals and in this
    device's own bytes per link (its host->GPU link is its own PCIe link). Loader threads stage through it too."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        self._lock = threading.Lock()
        self.bytes: collections.Counter = collections.Counter()
        self.count: collections.Counter = collections.Counter()

    def add_transfer(self, link: str, nbytes: int, seconds: float, issued_only: bool = False) -> None:
        with self._lock:
            self.bytes[link] += int(nbytes)
            self.count[link] += 1
        self._metrics.add_transfer(link, nbytes, seconds, issued_only)

    def __getattr__(self, name: str):
        return getattr(self._metrics, name)


@dataclasses.dataclass(eq=False)
class ExpertMovers:
    """One device's expert tiers: its GPU slot pool, its pinned host cache (pinned memory of that device), the ledger of
    its budgets and the accounts of its link. The first device's are the engine's experts / host_cache / mm.
    Threads: the engine thread owns all of it; the disk loader threads only stage into `host_cache` (HostCache.put,
    under its lock) and count bytes through `link` (DeviceLink, under its lock)."""

    device: Any
    experts: ExpertCache
    host_cache: HostCache
    mm: MemoryManager
    link: DeviceLink

    @property
    def s_dev(self):
        return shardings(self.device)[0]


def _owners(popularity, layer: int, n_experts: int, expert_bytes: int, n_devices: int) -> np.ndarray:
    """[E] device index of each expert of `layer`: parallel.partition_experts (equal bytes per device, measured
    popularity balanced when given)."""
    owner = np.zeros(n_experts, np.int32)
    if n_devices > 1:
        from dsjax.runtime.parallel import partition_experts
        for d, ids in enumerate(partition_experts(layer_popularity(popularity, layer, n_experts),
                                                  [expert_bytes] * n_experts, n_devices)):
            owner[ids] = d
    return owner


def _expert_device(device, experts: int, gpu: int, host: int, layout: ExpertLayout, metrics: Metrics) -> ExpertMovers:
    """The movers of a device beyond the first, which holds routed experts only: its budgets (gpu_memory and
    host_memory apply to each device) as plan_devices.experts_only_room splits them, each at most the `experts`
    (layer, expert) pairs it owns."""
    from dsjax.runtime.plan_devices import experts_only_room
    nb = layout.nbytes
    pools, gpu_room, host_room = experts_only_room(gpu, host)
    slots, cached = min(experts, gpu_room // nb), min(experts, host_room // nb)
    if slots < 1:
        raise BudgetError(f"gpu_memory={fmt_bytes(gpu)} per device leaves no GPU expert slot on {device} (one expert "
                          f"is {fmt_bytes(nb)}; its expert_cache + active_layers pools hold {fmt_bytes(gpu_room)}): "
                          "raise gpu_memory")
    mm = MemoryManager(dataclasses.replace(pools, expert_cache=slots * nb, active_layers=0, host_weights=cached * nb,
                                           host_layer_cache=0))
    link = DeviceLink(metrics)
    return ExpertMovers(device, ExpertCache(slots, layout, mm, link, device=device),
                        HostCache(cached, mm, link, nb, device=device), mm, link)

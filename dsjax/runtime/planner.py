"""The Planner: from model byte counts, memory budgets and link bandwidths to a Placement and a predicted speed.

Pure bookkeeping, no devices and no I/O beyond reading one packaged table (the quality fewer active experts cost,
`measured_active_experts_quality`): it decides which layers stay resident on the GPU, how many GPU layer slots
stream the rest, how many GPU expert slots each MoE layer gets and how many experts the pinned host tier holds, and
it predicts decode tokens/s at batch 1 from the bytes each token must move over each link. The movers (layer ring,
expert cache, disk reader) execute the Placement; they never second-guess it.

Budget split within a tier follows the seed design (§3): GPU 2/8/4/2 of 16 (reserve, active layers, expert cache,
compute) and host 40/32/16/8 of 96 (model weights, layer cache, prefetch, reserve), scaled to the given budgets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from dsjax.config import ModelConfig
from dsjax.model.weights import F32_KEYS, global_shapes, layer_shapes
from dsjax.runtime.scheduler import DEFAULT_STEP_TOKENS

GB = 10**9
GIB = 2**30
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}

# What routing each token to fewer of its experts cost the embedded model, per k (bench/active_experts_quality.py).
ACTIVE_EXPERTS_QUALITY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                      "active_experts_quality.json")

GPU_SPLIT = dict(reserve=2, active_layers=8, expert_cache=4, compute=2)         # of 16 (seed §3.1)
HOST_SPLIT = dict(model_weights=40, layer_cache=32, prefetch=16, reserve=8)     # of 96 (seed §3.2)


GIB = 1 << 30


def pinned_cap_gib(need: int) -> int:
    """The cap, in whole GiB, that dsjax gives JAX's pinned host pool for a plan pinning at most `need` bytes at once:
    10% and 2 GiB over it (buffers outside the plan's pools, the pool's rounding; memory.cap_pinned_host)."""
    return -(-(need + need // 10 + 2 * GIB) // GIB)


class BudgetError(ValueError):
    """A budget too small to run the model; the message says what the minimum is."""


def parse_bytes(value: int | float | str, name: str = "budget") -> int:
    """Bytes from an integer or a string with a unit: '512MB', '16GB' (10^9), '16GiB' (2^30)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not a size")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a non-negative number of bytes")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{name}={value!r} is not a size; write bytes as an integer or e.g. '512MB', '16GB', '16GiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# JAX's GPU allocator gives a process this fraction of the card unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise
# (jax 0.11.2 on an H100, preallocated or not: 59.4 of 79.2 GiB, bench/RESULTS.md run 12); the setting dsjax suggests
# where a budget needs more (75.2 GiB there).
JAX_MEM_FRACTION = 0.75
SUGGESTED_MEM_FRACTION = ".95"


def is_unlimited(n: float) -> bool:
    """A byte count that stands for "no limit" (the runtime's UNLIMITED, or anything near it)."""
    return n >= 2**59


def fmt_bytes(n: float) -> str:
    if is_unlimited(n):
        return "unlimited"
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


# ---- what the model weighs ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelBytes:
    """Byte counts per placement unit. `layer_core[i]` is layer i without its routed experts."""

    embed: int                      # stays in host memory: a lookup of B rows needs no GPU table
    head: int                       # final norm + lm_head, always on the GPU
    layer_core: tuple[int, ...]
    expert: int                     # one routed expert: gate + up + down
    n_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    kv_bytes_per_token: int         # compressed MLA cache over all layers
    model_top_k: int = 0            # the model's own top-k when active_experts routes to fewer (top_k); 0 = top_k
    attention: tuple[int, int, int, int] = (0, 0, 0, 0)   # heads, qk_nope_head_dim, v_head_dim, kv_lora_rank (0: unknown)

    @property
    def total(self) -> int:
        return self.embed + self.head + sum(self.layer_core) + self.expert * self.n_experts * len(self.moe_layers)

    @property
    def routed_bytes_per_token(self) -> int:
        """Routed-expert bytes one token reads: top_k experts in every MoE layer."""
        return self.top_k * self.expert * len(self.moe_layers)

    def with_top_k(self, k: int) -> "ModelBytes":
        """These bytes with each token routed to k experts (memory_config.active_experts; k = the model's: as is)."""
        K = self.model_top_k or self.top_k
        return dataclasses.replace(self, top_k=k, model_top_k=0 if k == K else K)

    @classmethod
    def from_config(cls, cfg: ModelConfig, fmt: str = "nvfp4", policy: str = "mlp",
                    dtype_bytes: int = 2) -> "ModelBytes":
        """Byte counts of a store that `dsjax convert --format fmt --policy policy` would write for this config."""
        from dsjax.store.policy import decide

        def nbytes(key: str, shape: tuple[int, ...]) -> int:
            n = math.prod(shape)
            if decide(key, shape, fmt, policy).fp4:
                from dsjax.quant import BLOCK_SIZES
                lead = math.prod(shape[:-2])
                return n // 2 + n // BLOCK_SIZES[fmt] + 4 * lead
            return n * (4 if key in F32_KEYS else dtype_bytes)

        g = global_shapes(cfg)
        cores, expert, moe = [], 0, []
        for i in range(cfg.num_hidden_layers):
            shapes = layer_shapes(cfg, i)
            cores.append(sum(nbytes(k, s) for k, s in shapes.items() if not k.startswith("experts_")))
            if cfg.is_moe_layer(i):
                moe.append(i)
                expert = sum(nbytes(k, shapes[k][1:]) for k in ("experts_gate", "experts_up", "experts_down"))
        return cls(embed=nbytes("embed", g["embed"]), head=nbytes("final_norm", g["final_norm"])
                   + nbytes("lm_head", g["lm_head"]), layer_core=tuple(cores), expert=expert,
                   n_experts=cfg.n_routed_experts or 0, top_k=cfg.num_experts_per_tok or 0, moe_layers=tuple(moe),
                   kv_bytes_per_token=cfg.num_hidden_layers * cfg.kv_cache_dim * dtype_bytes,
                   attention=attention_dims(cfg))


def attention_dims(cfg: ModelConfig) -> tuple[int, int, int, int]:
    return (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)


def attention_peak_bytes(mb: "ModelBytes", context_tokens: int, step_tokens: int = DEFAULT_STEP_TOKENS) -> int:
    """f32 temporaries of the largest attention call an engine makes at this context (an estimate; no pool holds them):
    a prompt of context_tokens prefilled alone, or the step's chunk rows (step_tokens // 256 rows of 256 queries) at
    that width, each as attention runs it (attention.held_bytes: query blocks, the absorbed form past the limit)."""
    from dsjax.model.attention import held_bytes
    H, N, V, C = mb.attention
    if not H or context_tokens < 1:
        return 0
    S, chunk = context_tokens, min(step_tokens, 256)
    return max(held_bytes("naive", B, T, S, H, N, V, C)
               for B, T in ((1, S), (max(1, step_tokens // chunk), min(chunk, S))))


# ---- budgets, links, placement ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class Links:
    """Link ceilings in bytes/s. Defaults are the product's target box (PCIe 5 x16 pinned, a 12 GB/s NVMe, an
    HBM-class GPU); pass measured values to plan for the machine at hand."""

    h2d: float = 50 * GB
    disk: float = 12 * GB
    hbm: float = 3 * 10**12
    # Host work per layer, from the runtime's timers on the H200 machine (bench/RESULTS.md, V3 slice run 5, budget
    # config, batch 1: 30.5 ms of host time per decode step over 1 dense + 6 MoE layers): dispatching a layer's jitted
    # calls, and for an MoE layer whose experts stream, the routing sync, the slot bookkeeping and copies, and the
    # prediction's prefetch. With them the plan said 31.1 / 106.8 tok/s for run 5's budget / no-budget rows (measured
    # 29.1 / 125.6; run 3's terms, 5.2 and 2.0 ms, said 21.3 / 63.9).
    # Loading on demand (overlap_io false) adds the links to the host work, but a layer's expert copies are issued
    # while the link moves the ones issued before them, so that layer's syncing costs only the routing read-back
    # itself (readback_s: its CPU time in run 5, 0.28 ms over 6 MoE layers): run 5's on_demand row, predicted 18.7
    # tok/s when sync_s was summed with the link, is 32.4 this way (measured 32.6).
    sync_s: float = 3.8e-3          # per streamed MoE layer: routing sync + copies + prediction
    layer_call_s: float = 1.1e-3    # per layer: host-side dispatch of its jitted calls
    readback_s: float = 5e-5        # per streamed MoE layer, loading on demand: the routing read-back alone
    # The CPU expert kernel's bytes/s at batch 1 where host-resident experts that miss the GPU are computed on the CPU
    # beside the copies (compute_config.cpu_experts, issue 24); 0 = that path is off.
    cpu_rate: float = 0.0
    measured: bool = False


@dataclasses.dataclass(frozen=True)
class Pools:
    reserve: int
    active_layers: int
    expert_cache: int
    compute: int
    host_weights: int
    host_layer_cache: int
    host_prefetch: int
    host_reserve: int

    @classmethod
    def split(cls, gpu: int, host: int) -> "Pools":
        gs, hs = sum(GPU_SPLIT.values()), sum(HOST_SPLIT.values())
        return cls(*(gpu * v // gs for v in GPU_SPLIT.values()), *(host * v // hs for v in HOST_SPLIT.values()))


@dataclasses.dataclass(frozen=True)
class Placement:
    """What the planner decided, and what it expects a decode token to cost."""

    pools: Pools
    resident_layers: tuple[int, ...]      # layer cores kept on the GPU for the whole run
    ring_slots: int                       # GPU slots that stream the other layer cores (max_gpu_layers)
    gpu_expert_slots: int                 # per MoE layer
    gpu_expert_pool: int                  # bytes for GPU expert slots (+ the in-flight staging)
    host_experts: int                     # per MoE layer, pinned host copies
    host_layers: tuple[int, ...]          # streamed layer cores that sit in pinned host memory
    prefetch_layers: int
    max_kv_tokens: int                    # tokens of KV cache the compute pool holds (all requests together)
    context_tokens: int                   # prompt + output of one request the plan was made for
    h2d_bytes_per_token: float
    disk_bytes_per_token: float
    hbm_bytes_per_token: float
    t_h2d: float
    t_disk: float
    t_compute: float
    t_token: float
    bound: str                            # the term that sets t_token
    overlap_io: bool
    cpu_bytes_per_token: float = 0.0      # host-resident expert bytes the CPU computes in place (links.cpu_rate)
    t_cpu: float = 0.0
    attention_peak: int = 0               # attention_peak_bytes: the largest attention call's temporaries

    def pinned_host_bytes(self, mb: "ModelBytes", devices: int = 1) -> int:
        """Host memory the plan pins: the embedding, the layer cores kept in host memory and the host expert caches
        (each expert at most once over `devices` devices). A lower bound of the process's memory: XLA's pinned pool
        grows in regions and the loaders' buffers come and go."""
        streamed = self.gpu_expert_slots < mb.n_experts
        experts = min(mb.n_experts, self.host_experts * devices) * len(mb.moe_layers) * mb.expert if streamed else 0
        return mb.embed + sum(mb.layer_core[i] for i in self.host_layers) + experts

    def pinned_host_peak(self, mb: "ModelBytes", devices: int = 1) -> int:
        """pinned_host_bytes plus, where experts stream from disk (the host caches cannot hold a layer's experts), the
        prefetch pool: disk reads in flight are staged in pinned buffers beside the caches (HostCache.put), at most
        that pool's bytes of them. What the pinned pool must hold at once (memory.cap_pinned_host)."""
        streamed = self.gpu_expert_slots < mb.n_experts
        from_disk = streamed and bool(mb.moe_layers) and self.host_experts * devices < mb.n_experts
        return self.pinned_host_bytes(mb, devices) + (self.pools.host_prefetch if from_disk else 0)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.t_token

    def report(self, mb: ModelBytes, links: Links) -> str:
        p = self.pools
        n_layers, moe = len(mb.layer_core), len(mb.moe_layers)
        src = "measured" if links.measured else "assumed"
        lines = [
            f"model: {fmt_bytes(mb.total)} ({n_layers} layers, {moe} MoE x {mb.n_experts} experts of "
            f"{fmt_bytes(mb.expert)}, top-{mb.top_k})",
            *([f"active_experts={mb.top_k} is below the model's top-{mb.model_top_k}: routed experts "
               f"{fmt_bytes(mb.routed_bytes_per_token)} per token instead of "
               f"{fmt_bytes(mb.model_top_k * mb.expert * moe)}, at a quality cost (bench/RESULTS.md, 'Fewer active "
               "experts')"] if mb.model_top_k and mb.model_top_k != mb.top_k else []),
            f"GPU pools: reserve {fmt_bytes(p.reserve)}, active layers {fmt_bytes(p.active_layers)}, expert cache "
            f"{fmt_bytes(p.expert_cache)}, compute {fmt_bytes(p.compute)}",
            *([f"the card: JAX gives a process {JAX_MEM_FRACTION:.0%} of it by default, so this GPU budget needs a "
               f"card of {fmt_bytes(gpu / JAX_MEM_FRACTION)}, or {fmt_bytes(gpu / float(SUGGESTED_MEM_FRACTION))} "
               f"with XLA_PYTHON_CLIENT_MEM_FRACTION={SUGGESTED_MEM_FRACTION} set before starting (the load refuses "
               "a budget past what JAX gives)"]
              if not is_unlimited(gpu := p.reserve + p.active_layers + p.expert_cache + p.compute) else []),
            f"host pools: model weights {fmt_bytes(p.host_weights)}, layer cache {fmt_bytes(p.host_layer_cache)}, "
            f"prefetch {fmt_bytes(p.host_prefetch)}, reserve {fmt_bytes(p.host_reserve)}; pinned by this plan "
            f"{fmt_bytes(self.pinned_host_bytes(mb))} (embedding, host layer cores, host experts), at most "
            f"{fmt_bytes(peak := self.pinned_host_peak(mb))} with disk reads in flight: a load caps JAX's pinned "
            f"pool at {pinned_cap_gib(peak)} GiB (XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, unless set); the process takes "
            "more",
            f"placement: {len(self.resident_layers)}/{n_layers} layers resident on GPU, {self.ring_slots} GPU layer "
            f"slots stream the rest ({len(self.host_layers)} from pinned host, "
            f"{n_layers - len(self.resident_layers) - len(self.host_layers)} from disk)",
            f"GPU expert pool {fmt_bytes(self.gpu_expert_pool)} ({self.gpu_expert_pool // max(mb.expert, 1)} slots "
            f"shared by the MoE layers, {mb.top_k}x{1 + self.prefetch_layers} of them for experts in flight); "
            f"cached per MoE layer: {self.gpu_expert_slots} on the GPU, {self.host_experts} in pinned host, "
            f"{mb.n_experts - max(self.gpu_expert_slots, self.host_experts)} on disk only; "
            f"KV cache (compute pool): {self.max_kv_tokens} tokens, "
            f"{self.max_kv_tokens // max(self.context_tokens, 1)} requests of {self.context_tokens} tokens at once "
            "(more wait; short ones take fewer pages)",
            f"decode, batch 1, uniform routing (no locality assumed): per token "
            f"disk->host {fmt_bytes(self.disk_bytes_per_token)} @ {fmt_bytes(links.disk)}/s ({src}) = "
            f"{self.t_disk * 1e3:.1f} ms; host->GPU {fmt_bytes(self.h2d_bytes_per_token)} @ {fmt_bytes(links.h2d)}/s "
            f"({src}) = {self.t_h2d * 1e3:.1f} ms; "
            + (f"CPU computes {fmt_bytes(self.cpu_bytes_per_token)} of host-resident experts beside the copies @ "
               f"{fmt_bytes(links.cpu_rate)}/s = {self.t_cpu * 1e3:.1f} ms; " if links.cpu_rate else "")
            + f"GPU reads {fmt_bytes(self.hbm_bytes_per_token)} @ "
            f"{fmt_bytes(links.hbm)}/s + host work per layer (dispatch, routing sync, copies) = "
            f"{self.t_compute * 1e3:.1f} ms",
            f"predicted: {self.tokens_per_s:.2f} tok/s ({self.t_token * 1e3:.1f} ms/token, bound by {self.bound}"
            f"{', links overlapped' if self.overlap_io else ', no overlap (load on demand)'})",
        ]
        if self.attention_peak:
            over = self.attention_peak > p.reserve
            lines.insert(-2, f"attention: the largest call (a {self.context_tokens}-token prompt alone, or a step's "
                         f"prompt chunks at that width) holds ~{fmt_bytes(self.attention_peak)} of f32 temporaries, "
                         f"in no pool; the GPU reserve is {fmt_bytes(p.reserve)}"
                         + ("; MORE than the reserve: long prompts may not fit (lower --context / max_context or "
                            "step_tokens, or give the GPU more)" if over else ""))
        return "\n".join(lines)


def plan(mb: ModelBytes, gpu_memory: int | str, host_memory: int | str, *, max_gpu_layers: int = 3,
         prefetch_layers: int = 2, links: Links = Links(), overlap_io: bool = True,
         context_tokens: int = 4096, step_tokens: int = DEFAULT_STEP_TOKENS) -> Placement:
    """Decide placement for the budgets; raise BudgetError naming the minimum when the model cannot run at all."""
    gpu, host = parse_bytes(gpu_memory, "gpu_memory"), parse_bytes(host_memory, "host_memory")
    if max_gpu_layers < 1:
        raise ValueError(f"max_gpu_layers={max_gpu_layers} must be >= 1")
    if step_tokens < 1:
        raise ValueError(f"step_tokens={step_tokens} must be >= 1 (prompt tokens a step prefills)")
    pools = Pools.split(gpu, host)
    n = len(mb.layer_core)
    moe = len(mb.moe_layers)
    biggest = max(mb.layer_core)
    staging = mb.top_k * (1 + prefetch_layers) * mb.expert      # experts in flight: this layer + the prefetched
    need_active = mb.head + max_gpu_layers * biggest
    need_kv = context_tokens * mb.kv_bytes_per_token
    if pools.active_layers < need_active or pools.expert_cache < staging or pools.compute < need_kv:
        total = sum(GPU_SPLIT.values())
        minimum = minimum_gpu_memory(mb, max_gpu_layers=max_gpu_layers, prefetch_layers=prefetch_layers,
                                     context_tokens=context_tokens)
        raise BudgetError(
            f"gpu_memory {fmt_bytes(gpu)} is too small: the active-layer pool ({GPU_SPLIT['active_layers']}/{total}) "
            f"must hold the head ({fmt_bytes(mb.head)}) and {max_gpu_layers} layer slots of {fmt_bytes(biggest)}, "
            f"the expert pool ({GPU_SPLIT['expert_cache']}/{total}) {mb.top_k}x{1 + prefetch_layers} experts in "
            f"flight ({fmt_bytes(staging)}), the compute pool ({GPU_SPLIT['compute']}/{total}) a KV cache of "
            f"{context_tokens} tokens ({fmt_bytes(need_kv)}); the minimum is about {fmt_bytes(minimum)} "
            f"(or lower max_gpu_layers / prefetch_layers / context)")
    # Layer cores: keep as many resident as the active pool allows beyond the ring; stream the rest.
    room = pools.active_layers - need_active
    resident: list[int] = []
    for i in sorted(range(n), key=lambda i: mb.layer_core[i]):
        if mb.layer_core[i] <= room:
            resident.append(i)
            room -= mb.layer_core[i]
    resident.sort()
    ring = 0 if len(resident) == n else max_gpu_layers
    streamed = [i for i in range(n) if i not in resident]
    # Host: the embedding and the streamed layer cores (they cross PCIe every token) go first-fit into the model
    # weights pool, then the layer cache; experts take what is left of both, in whole experts (the MemoryManager
    # accounts in the same order).
    host_w = pools.host_weights - mb.embed
    host_lc = pools.host_layer_cache
    in_flight = mb.top_k * mb.expert                            # one layer's experts read from disk at once
    if host_w < 0 or pools.host_prefetch < in_flight:
        raise BudgetError(f"host_memory {fmt_bytes(host)} is too small: the model-weights pool must hold the "
                          f"embedding ({fmt_bytes(mb.embed)}) and the prefetch pool one layer's {mb.top_k} experts "
                          f"({fmt_bytes(in_flight)}); the minimum is about {fmt_bytes(minimum_host_memory(mb))}")
    host_layers = []
    for i in streamed:
        if mb.layer_core[i] <= host_w:
            host_w -= mb.layer_core[i]
        elif mb.layer_core[i] <= host_lc:
            host_lc -= mb.layer_core[i]
        else:
            continue
        host_layers.append(i)
    E = mb.n_experts
    # When every layer core is resident, the ring needs no slots: the active pool's leftover goes to experts.
    expert_pool = pools.expert_cache + (room + need_active - mb.head if ring == 0 else 0)
    if moe and mb.expert:
        gpu_slots = min(E, (expert_pool - staging) // (mb.expert * moe))
        host_experts = min(E, (host_lc // mb.expert + host_w // mb.expert) // moe)
    else:
        gpu_slots = host_experts = 0
    # Per token (batch 1, uniform routing): a cached expert is hit with probability slots / E.
    K = mb.top_k
    p_gpu = gpu_slots / E if E else 1.0
    p_host = max(gpu_slots, host_experts) / E if E else 1.0   # GPU slots are filled through the host cache
    streamed_core = sum(mb.layer_core[i] for i in streamed)
    disk_core = sum(mb.layer_core[i] for i in streamed if i not in host_layers)
    h2d = streamed_core + moe * K * (1 - p_gpu) * mb.expert
    disk = disk_core + moe * K * (1 - p_host) * mb.expert
    hbm = mb.head + sum(mb.layer_core) + moe * K * mb.expert
    # The CPU path computes host-resident misses in place while the link moves the rest, so both finish together:
    # c / cpu_rate = (h2d - c) / h2d_rate, at most the host-resident misses' bytes; the link keeps the rest.
    cpu = 0.0
    if links.cpu_rate > 0:
        cpu = min(h2d * links.cpu_rate / (links.cpu_rate + links.h2d), moe * K * (p_host - p_gpu) * mb.expert)
        h2d, hbm = h2d - cpu, hbm - cpu
    syncs = moe * (links.sync_s if overlap_io else links.readback_s) if (gpu_slots < E) else 0.0
    t_h2d, t_disk = h2d / links.h2d, disk / links.disk
    t_cpu = cpu / links.cpu_rate if cpu else 0.0
    t_compute = hbm / links.hbm + syncs + n * links.layer_call_s
    terms = {"disk->host": t_disk, "host->GPU": t_h2d, "GPU compute": t_compute}
    if cpu:
        terms["CPU experts"] = t_cpu
    if overlap_io:
        bound = max(terms, key=terms.get)
        t_token = terms[bound]
    else:
        bound, t_token = "the sum of all links (no overlap)", sum(terms.values())
    return Placement(pools=pools, resident_layers=tuple(resident), ring_slots=ring, gpu_expert_slots=int(gpu_slots),
                     gpu_expert_pool=int(expert_pool),
                     host_experts=int(host_experts), host_layers=tuple(host_layers),
                     prefetch_layers=prefetch_layers,
                     max_kv_tokens=int(pools.compute // max(mb.kv_bytes_per_token, 1)),
                     context_tokens=context_tokens, h2d_bytes_per_token=h2d,
                     disk_bytes_per_token=disk, hbm_bytes_per_token=hbm, t_h2d=t_h2d, t_disk=t_disk,
                     t_compute=t_compute, t_token=t_token, bound=bound, overlap_io=overlap_io,
                     cpu_bytes_per_token=cpu, t_cpu=t_cpu,
                     attention_peak=attention_peak_bytes(mb, context_tokens, step_tokens))


def minimum_gpu_memory(mb: ModelBytes, *, max_gpu_layers: int = 3, prefetch_layers: int = 2,
                       context_tokens: int = 4096) -> int:
    """The smallest GPU budget `plan` accepts: each pool of the split must hold its minimum."""
    total = sum(GPU_SPLIT.values())
    active = mb.head + max_gpu_layers * max(mb.layer_core)
    staging = mb.top_k * (1 + prefetch_layers) * mb.expert
    kv = context_tokens * mb.kv_bytes_per_token
    return max(-(-active * total // GPU_SPLIT["active_layers"]), -(-staging * total // GPU_SPLIT["expert_cache"]),
               -(-kv * total // GPU_SPLIT["compute"]))


def minimum_host_memory(mb: ModelBytes) -> int:
    """The smallest host budget `plan` accepts: the embedding in the model-weights pool, one layer's experts in the
    prefetch pool."""
    total = sum(HOST_SPLIT.values())
    return max(-(-mb.embed * total // HOST_SPLIT["model_weights"]),
               -(-mb.top_k * mb.expert * total // HOST_SPLIT["prefetch"]))


# ---- fewer active experts: what each k would run at, beside what it cost where it was measured ---------------------

def measured_active_experts_quality(path: str = ACTIVE_EXPERTS_QUALITY) -> dict:
    """The quality cost of `active_experts = k` as bench/active_experts_quality.py measured it on the embedded toy model
    (dsjax/data/shakespeare-v3-tiny, top-4 of 16 experts): {model, top_k, measured: {command, ...}, rows: [{k,
    fraction, perplexity, perplexity_increase, top1_agreement, kl_nats}]}. Not a measurement of any other model."""
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActiveExpertsOption:
    """One row of `dsjax plan`'s options: the plan with each token routed to k experts, and the quality that k / top-k
    cost the model it was measured on (None: no measurement at that fraction)."""

    k: int
    fraction: float                       # k / the model's own top-k
    placement: Placement | None           # None: the budgets cannot hold this k (BudgetError)
    quality: dict | None                  # a row of measured_active_experts_quality() at the same fraction
    selected: bool                        # the k that was asked for (active_experts)


def active_experts_options(mb: ModelBytes, gpu_memory: int | str, host_memory: int | str, quality: dict, *,
                           selected: int = 0, **plan_kwargs) -> list[ActiveExpertsOption]:
    """The model's own top-k and each fewer k at the fractions `quality` was measured at (top-4 measured at 4/3/2/1:
    V3's top-8 -> 8, 6, 4, 2), plus `selected` if it is another k; largest k first. Each row plans `mb.with_top_k(k)`
    under the same budgets and plan_kwargs as `plan`.

    >>> mb = ModelBytes.from_config(ModelConfig.from_json("DeepSeek-V3/config.json"), "nvfp4", "mlp")
    >>> rows = active_experts_options(mb, "16GB", "96GB", measured_active_experts_quality())
    >>> [(r.k, round(r.placement.tokens_per_s, 2), r.quality["perplexity_increase"]) for r in rows]
    [(8, 1.2, 0.0), (6, 1.6, 0.01373), (4, 1.85, 0.05885), (2, 2.07, 0.28303)]
    """
    K = mb.model_top_k or mb.top_k
    if not K or not mb.moe_layers:
        return []
    Q = quality["top_k"]
    at = {r["k"] * K // Q: r for r in quality["rows"] if r["k"] * K % Q == 0 and r["k"] * K // Q >= 1}
    ks = sorted(set(at) | ({selected} if 1 <= selected <= K else set()), reverse=True)
    rows = []
    for k in ks:
        try:
            p = plan(mb.with_top_k(k), gpu_memory, host_memory, **plan_kwargs)
        except BudgetError:
            p = None
        rows.append(ActiveExpertsOption(k=k, fraction=k / K, placement=p, quality=at.get(k), selected=k == selected))
    return rows

"""Placement and predicted decode speed over several GPUs of one host (issue 22): pure bookkeeping, no devices.

Each GPU owns 1/N of every MoE layer's routed experts (parallel.partition_experts) and a copy of everything else (the
embedding, attention, norms, routers, shared experts, head and the KV cache: the scheme parallel.py runs), or, as a
what-if, a 1/N shard of the layer cores and head (`core="sharded"`: tensor-parallel attention, not built). A device
is planned like one GPU holding a smaller model (`device_model_bytes`), by the single-GPU planner (planner.plan), under
its own budgets; the per-step traffic is then counted for the experts a step actually sends to it.

The links: each GPU has its own host link (PCIe), so the host->GPU term is the slowest device's; the disk is shared,
so its term is the sum of every device's disk reads. GPU compute is the slowest device's HBM reads plus the host work
per layer (planner.Links: dispatch per layer, routing sync per streamed MoE layer, assumed not to grow with N: one
routing, replicated) plus one all-reduce per MoE layer (the psum of the expert rows; ALLREDUCE_S, assumed). With the
links overlapped a step takes the largest term. When every device can hold its whole share in HBM (weights + the KV
cache of `context_tokens` + ACTIVATION_RESERVE) the plan is "all in HBM": no links, no syncs (what
parallel.ExpertParallelEngine runs); otherwise "tiered". `core="first"` plans the tiered layout that runs
(tiered.TieredEngine with devices=): the layer cores, head and KV on the first GPU only, each other GPU routed experts
only, its budgets' layer pools given to expert slots and host cache, and one Python thread dispatching for all (each
other GPU adds about one layer call of host work per MoE layer); with every share resident it plans "replicated".

Routing is assumed uniform and independent over tokens: a layer selects E(1 - (1 - K/E)^B) distinct experts in a
step of B decode rows (K at batch 1, where this is the planner's own arithmetic: one device gives plan()'s figure),
and a device receives its share E_d/E of them. Batch B's prediction is B tokens per step.
"""

# N devices, E experts, E_d experts of one device per layer, K top-k, B decode rows per step

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dsjax.runtime.planner import BudgetError, Links, ModelBytes, Placement, Pools, fmt_bytes, parse_bytes, plan

ALLREDUCE_S = 30e-6              # one psum of a decode step's expert rows over NVLink (NCCL small-message latency)
DEFAULT_LINKS = Links()          # the product's target box: PCIe 5 per GPU, one 12 GB/s NVMe, HBM-class GPUs
ACTIVATION_RESERVE = 2 * 10**9   # bytes an all-in-HBM device keeps free beside weights and KV (activations, XLA)
CORES = ("replicated", "first", "sharded")

__all__ = ["ACTIVATION_RESERVE", "ALLREDUCE_S", "DevicePlan", "DevicesPlan", "device_model_bytes",
           "device_weight_bytes", "expected_experts", "experts_only_room", "fits_all_in_hbm", "plan_devices", "table",
           "v3_model_bytes"]


def expected_experts(n_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a layer selects in a step of `batch` rows under uniform routing (top_k at batch 1)."""
    if batch <= 1:
        return float(top_k)
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** batch)


def device_model_bytes(mb: ModelBytes, n_devices: int, core: str = "replicated") -> ModelBytes:
    """The model one device of N holds: ceil(E/N) routed experts per MoE layer (the largest share); the layer cores
    and head whole ("replicated") or 1/N of them ("sharded"); the embedding stays whole (a row lookup). `top_k` is what
    may land on one device at once (min(K, E_d): the staging the planner reserves)."""
    if core not in CORES:
        raise ValueError(f"core={core!r}: 'replicated' (built all in HBM), 'first' (built tiered: the layers on the "
                         "first GPU only) or 'sharded' (tensor-parallel, a what-if)")
    E_d = -(-mb.n_experts // n_devices) if mb.n_experts else 0
    split = n_devices if core == "sharded" else 1
    return dataclasses.replace(mb, n_experts=E_d, top_k=min(mb.top_k, E_d),
                               layer_core=tuple(-(-c // split) for c in mb.layer_core), head=-(-mb.head // split))


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """One device's share, where it lives, and what a decode step moves and reads on that device."""

    index: int
    gpu_memory: int
    host_memory: int
    experts_per_layer: int                # E_d routed experts of each MoE layer owned by this device
    expert_bytes: int                     # bytes of those experts over all MoE layers
    weight_bytes: int                     # everything the device owns: its experts + its copy (or shard) of the rest
    resident: bool                        # everything it owns fits in HBM
    placement: Placement | None           # the single-GPU planner's decision for the tiered case
    gpu_experts: int                      # per MoE layer, on the GPU (E_d when resident)
    host_experts: int                     # per MoE layer, in this device's pinned host cache
    kv_tokens: int                        # KV cache tokens the device holds (every device holds all of them)
    experts_per_step: float               # distinct experts per MoE layer a step sends to this device
    h2d_bytes: float                      # per step, over this device's own host link
    disk_bytes: float                     # per step, this device's reads from the shared disk
    hbm_bytes: float                      # per step, read from this device's HBM
    t_h2d: float
    t_compute: float


@dataclasses.dataclass(frozen=True)
class DevicesPlan:
    n_devices: int
    mode: str                             # "all in HBM" (built) or "tiered" (not built)
    core: str                             # "replicated" (built) or "sharded" (what-if)
    batch: int
    devices: tuple[DevicePlan, ...]
    disk_bytes: float                     # per step, all devices together (one shared disk)
    t_disk: float
    t_h2d: float                          # the slowest device's link
    t_compute: float                      # the slowest device's HBM reads + host work + all-reduces
    t_step: float
    bound: str
    overlap_io: bool

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second over the whole batch (B rows per step)."""
        return self.batch / self.t_step

    def report(self, mb: ModelBytes, links: Links) -> str:
        d0 = max(self.devices, key=lambda d: d.t_h2d + d.t_compute)
        cores = "on GPU 0 only" if self.core == "first" else self.core
        lines = [(f"{self.n_devices} GPU(s), {self.mode}, layer cores {cores}, decode batch {self.batch}: "
                  f"model {fmt_bytes(mb.total)}, each GPU owns {d0.experts_per_layer} of {mb.n_experts} experts per "
                  "MoE layer")]
        for d in self.devices:
            where = ("all in HBM" if d.resident else
                     f"{d.gpu_experts} on GPU, {d.host_experts} in its pinned host cache, "
                     f"{max(0, d.experts_per_layer - max(d.gpu_experts, d.host_experts))} on disk only per layer")
            lines.append(f"  GPU {d.index} ({fmt_bytes(d.gpu_memory)} GPU, {fmt_bytes(d.host_memory)} host): owns "
                         f"{fmt_bytes(d.weight_bytes)} ({fmt_bytes(d.expert_bytes)} routed experts); {where}; KV "
                         f"{d.kv_tokens} tokens; per step {d.experts_per_step:.2f} experts/layer, host->GPU "
                         f"{fmt_bytes(d.h2d_bytes)} ({d.t_h2d * 1e3:.1f} ms), disk {fmt_bytes(d.disk_bytes)}, HBM "
                         f"{fmt_bytes(d.hbm_bytes)} + host work = {d.t_compute * 1e3:.1f} ms")
        lines.append(f"shared disk: {fmt_bytes(self.disk_bytes)} per step @ {fmt_bytes(links.disk)}/s = "
                     f"{self.t_disk * 1e3:.1f} ms")
        lines.append(f"predicted: {self.tokens_per_s:.2f} tok/s ({self.t_step * 1e3:.1f} ms per step of "
                     f"{self.batch}, bound by {self.bound})")
        return "\n".join(lines)


def _per_device(value, n: int, name: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} budgets for {n} devices")
        return [parse_bytes(v, name) for v in value]
    return [parse_bytes(value, name)] * n


def device_weight_bytes(mb: ModelBytes, n_devices: int, core: str = "replicated") -> int:
    """Weight bytes one all-in-HBM device of N holds: the embedding, head and layer cores (whole, or its shard) and
    its largest share of the routed experts."""
    d = device_model_bytes(mb, n_devices, core)
    return d.embed + d.head + sum(d.layer_core) + d.expert * d.n_experts * len(d.moe_layers)


def plan_devices(mb: ModelBytes, n_devices: int, gpu_memory, host_memory, *, links: Links = DEFAULT_LINKS, batch: int = 1,
                 core: str = "replicated", context_tokens: int = 4096, attended_tokens: int = 0,
                 max_gpu_layers: int = 3, prefetch_layers: int = 2, overlap_io: bool = True,
                 allreduce_s: float = ALLREDUCE_S, reserve: int = ACTIVATION_RESERVE) -> DevicesPlan:
    """Plan N GPUs of one host: budgets per GPU (one value for all, or a list), each GPU its own host link, one disk.

    `attended_tokens`: cached tokens each decode row attends to (their KV bytes are read from HBM every step; 0 to
    leave them out as the single-GPU planner does at batch 1).

    Example:
        >>> mb = ModelBytes.from_config(v3_config, "nvfp4", "mlp")
        >>> plan_devices(mb, 8, "80GB", "96GB").mode                    # 'all in HBM'
        >>> plan_devices(mb, 2, "16GB", "96GB").tokens_per_s            # streamed, two links
    """
    if n_devices < 1:
        raise ValueError(f"n_devices={n_devices} must be >= 1")
    gpus, hosts = _per_device(gpu_memory, n_devices, "gpu_memory"), _per_device(host_memory, n_devices, "host_memory")
    mb_d = device_model_bytes(mb, n_devices, core)
    E, E_d, K, moe = mb.n_experts, mb_d.n_experts, mb.top_k, len(mb.moe_layers)
    n_layers = len(mb.layer_core)
    own = device_weight_bytes(mb, n_devices, core)
    kv_need = context_tokens * mb.kv_bytes_per_token
    resident = all(own + kv_need + reserve <= g for g in gpus)
    if core == "first" and resident:       # the all-in-HBM engine replicates the layers: plan what runs
        core = "replicated"
        mb_d, own = device_model_bytes(mb, n_devices, core), device_weight_bytes(mb, n_devices, core)
    # distinct experts a step selects per layer, the device with the largest share receives E_d/E of them
    per_step = expected_experts(E, K, batch) * (E_d / E if E else 0.0)
    kv_reads = batch * attended_tokens * mb.kv_bytes_per_token
    collectives = (moe + (n_layers if core == "sharded" else 0)) * allreduce_s if n_devices > 1 else 0.0
    devices = []
    for i, (g, h) in enumerate(zip(gpus, hosts)):
        hbm = mb_d.head + sum(mb_d.layer_core) + moe * per_step * mb.expert + kv_reads
        if core == "first" and i > 0:
            devices.append(_experts_only_device(i, g, h, mb, E_d, per_step, links, overlap_io))
            continue
        if resident:
            p, gpu_x, host_x, h2d, disk = None, E_d, 0, 0.0, 0.0
            kv_tokens = (g - own - reserve) // max(mb.kv_bytes_per_token, 1)
            syncs = 0.0
        else:
            try:
                p = plan(mb_d, g, h, max_gpu_layers=max_gpu_layers, prefetch_layers=prefetch_layers, links=links,
                         overlap_io=overlap_io, context_tokens=context_tokens)
            except BudgetError as e:
                raise BudgetError(f"GPU {i} of {n_devices}: {e}") from None
            gpu_x, host_x, kv_tokens = p.gpu_expert_slots, p.host_experts, p.max_kv_tokens
            streamed = [j for j in range(n_layers) if j not in p.resident_layers]
            p_gpu = gpu_x / E_d if E_d else 1.0
            p_host = max(gpu_x, host_x) / E_d if E_d else 1.0
            h2d = sum(mb_d.layer_core[j] for j in streamed) + moe * per_step * (1 - p_gpu) * mb.expert
            disk = (sum(mb_d.layer_core[j] for j in streamed if j not in p.host_layers)
                    + moe * per_step * (1 - p_host) * mb.expert)
            syncs = moe * (links.sync_s if overlap_io else links.readback_s) if gpu_x < E_d else 0.0
        if core == "first":
            # one Python thread drives every device: per MoE layer each other device adds its expert dispatches
            # (about one layer call: input copy, rows, copy back, merge) to the first device's host work
            collectives = (n_devices - 1) * moe * links.layer_call_s
            own_weights = mb.embed + mb.head + sum(mb.layer_core) + E_d * moe * mb.expert
        t_compute = hbm / links.hbm + syncs + n_layers * links.layer_call_s + collectives
        devices.append(DevicePlan(index=i, gpu_memory=g, host_memory=h, experts_per_layer=E_d,
                                  expert_bytes=E_d * moe * mb.expert,
                                  weight_bytes=own_weights if core == "first" else own, resident=resident,
                                  placement=p, gpu_experts=int(gpu_x), host_experts=int(host_x),
                                  kv_tokens=int(kv_tokens), experts_per_step=per_step, h2d_bytes=h2d,
                                  disk_bytes=disk, hbm_bytes=hbm, t_h2d=h2d / links.h2d, t_compute=t_compute))
    disk_all = sum(d.disk_bytes for d in devices)
    t_disk = disk_all / links.disk
    t_h2d = max(d.t_h2d for d in devices)
    t_compute = max(d.t_compute for d in devices)
    if overlap_io:
        terms = {"disk->host (shared)": t_disk, "host->GPU (per GPU link)": t_h2d, "GPU compute": t_compute}
        bound = max(terms, key=terms.get)
        t_step = terms[bound]
    else:
        bound, t_step = "the sum of all links (no overlap)", t_disk + max(d.t_h2d + d.t_compute for d in devices)
    return DevicesPlan(n_devices=n_devices, mode="all in HBM" if resident else "tiered", core=core, batch=batch,
                       devices=tuple(devices), disk_bytes=disk_all, t_disk=t_disk, t_h2d=t_h2d, t_compute=t_compute,
                       t_step=t_step, bound=bound, overlap_io=overlap_io)


def experts_only_room(gpu: int, host: int) -> tuple[Pools, int, int]:
    """A GPU that holds routed experts only (the built tiered layout's GPUs beyond the first): gpu_memory and
    host_memory split into the seed's pools as on the first GPU; it keeps the reserve and the compute pool (its expert
    rows' activations) and gives the pools of the layers it does not hold to experts. (pools, bytes for GPU expert
    slots = expert_cache + active_layers, bytes for its pinned host cache = host_weights + host_layer_cache)."""
    pools = Pools.split(gpu, host)
    return pools, pools.expert_cache + pools.active_layers, pools.host_weights + pools.host_layer_cache


def _experts_only_device(i: int, g: int, h: int, mb: ModelBytes, E_d: int, per_step: float, links: Links,
                         overlap_io: bool) -> DevicePlan:
    """A GPU beyond the first in the built tiered layout (tiered.TieredEngine with devices=): routed experts only, its
    budgets split into the seed's pools as on the first GPU, the pools of the layers it does not hold given to expert
    slots (expert_cache + active_layers) and to its pinned host cache (host_weights + host_layer_cache)."""
    moe = len(mb.moe_layers)
    _, gpu_room, host_room = experts_only_room(g, h)
    gpu_x = min(E_d, gpu_room // max(mb.expert * moe, 1))
    host_x = min(E_d, host_room // max(mb.expert * moe, 1))
    if gpu_x < 1 and E_d:
        raise BudgetError(f"GPU {i}: gpu_memory={fmt_bytes(g)} holds no expert slot per MoE layer ({moe} layers of "
                          f"{fmt_bytes(mb.expert)} experts); raise gpu_memory")
    p_gpu = gpu_x / E_d if E_d else 1.0
    p_host = max(gpu_x, host_x) / E_d if E_d else 1.0
    h2d = moe * per_step * (1 - p_gpu) * mb.expert
    disk = moe * per_step * (1 - p_host) * mb.expert
    hbm = moe * per_step * mb.expert
    return DevicePlan(index=i, gpu_memory=g, host_memory=h, experts_per_layer=E_d, expert_bytes=E_d * moe * mb.expert,
                      weight_bytes=E_d * moe * mb.expert, resident=False, placement=None, gpu_experts=int(gpu_x),
                      host_experts=int(host_x), kv_tokens=0, experts_per_step=per_step, h2d_bytes=h2d,
                      disk_bytes=disk, hbm_bytes=hbm, t_h2d=h2d / links.h2d, t_compute=hbm / links.hbm)


def v3_model_bytes(fmt: str = "nvfp4", policy: str = "mlp") -> ModelBytes:
    """DeepSeek-V3 (671B: 61 layers, 3 dense, 256 routed experts top-8) as a store of `fmt`/`policy` would weigh."""
    from dsjax.config import ModelConfig
    from dsjax.store.synthetic import v3_slice_config
    return ModelBytes.from_config(ModelConfig.from_dict(v3_slice_config(58, num_hidden_layers=61,
                                                                        first_k_dense_replace=3)), fmt, policy)


def table(rows: Sequence[tuple[int, str, str, str]], mb: ModelBytes, links: Links = DEFAULT_LINKS, *,
          batches: Sequence[int] = (1, 32), attended_tokens: int = 1024) -> str:
    """A markdown table of predictions, one line per (GPUs, GPU budget, host budget per GPU, core); the speedups are
    against the row of 1 GPU with the same budgets (list it first)."""
    lo, hi = batches[0], batches[-1]
    head = ["GPUs", "GPU / host per GPU", "layer cores", "mode", "experts per GPU per layer: GPU / host / disk",
            f"host->GPU per link, B={lo}", f"disk (shared), B={lo}", f"bound, B={lo}"]
    head += [f"tok/s B={b}" for b in batches] + [f"x 1 GPU, B={lo} / {hi}"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base: dict[tuple[str, str], tuple[float, float]] = {}
    for n, gpu, host, core in rows:
        plans = [plan_devices(mb, n, gpu, host, links=links, batch=b, core=core,
                              attended_tokens=attended_tokens if b > 1 else 0) for b in batches]
        p, d = plans[0], plans[0].devices[0]
        disk_only = max(0, d.experts_per_layer - max(d.gpu_experts, d.host_experts))
        where = (f"{d.experts_per_layer} / - / -" if d.resident
                 else f"{d.gpu_experts} / {d.host_experts} / {disk_only}")
        if n == 1:
            base[(gpu, host)] = (p.tokens_per_s, plans[-1].tokens_per_s)
        b1 = base.get((gpu, host))
        speedup = f"{p.tokens_per_s / b1[0]:.2f} / {plans[-1].tokens_per_s / b1[1]:.2f}" if b1 else "-"
        cells = [str(n), f"{gpu} / {host}", core, p.mode, where, fmt_bytes(d.h2d_bytes), fmt_bytes(p.disk_bytes),
                 p.bound] + [f"{q.tokens_per_s:.2f}" for q in plans] + [speedup]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def fits_all_in_hbm(mb: ModelBytes, n_devices: int, gpu_memory, context_tokens: int = 4096,
                    reserve: int = ACTIVATION_RESERVE) -> bool:
    """Whether N GPUs of `gpu_memory` each hold their share of every weight, the KV cache of one request of
    `context_tokens` and the reserve: the all-in-HBM expert-parallel engine (parallel.load_parallel) runs."""
    own = device_weight_bytes(mb, n_devices)
    return all(own + context_tokens * mb.kv_bytes_per_token + reserve <= g
               for g in _per_device(gpu_memory, n_devices, "gpu_memory"))


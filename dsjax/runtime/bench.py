"""`dsjax bench`: what a store does under budgets, against the ceilings of the machine measured in the same run.

For each configuration (the given budgets; everything resident; load on demand) and batch size it measures time to
first token, prefill and decode tokens/s, the bytes each decode step moved per link, each link's achieved rate
against its measured ceiling, the I/O roofline (bytes per link / ceiling, links overlapped) and how close decode got
to it, hit rates per tier, prediction precision/recall and, on a GPU, the busy fraction from a profiler trace.
Owns measuring and reporting; the engine and planner are used as they are.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from dsjax.runtime.metrics import device_memory, process_memory
from dsjax.runtime.planner import Links
from dsjax.runtime.tiers import pow2_bucket, shardings

GB = 1e9


@dataclasses.dataclass
class Ceilings:
    h2d: float          # pinned host -> device, bytes/s
    disk: float         # concurrent whole-file reads of store shards, bytes/s
    hbm: float | None   # device-to-device copy (read + write), bytes/s; None on a CPU
    cold: bool          # the disk figure was taken after dropping the page cache


def drop_page_cache() -> bool:
    """Drop the OS page cache (root only) so disk figures are cold; False when not permitted."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def measure_ceilings(store_path: str, cold: bool, h2d_bytes: int = 256 << 20) -> Ceilings:
    dev = jax.devices()[0]
    s_dev, s_host = shardings(dev)
    def copy_rate(src) -> float:
        """host->GPU bytes/s of copying `src` (a pinned array or a list of them): median of 5 after a warm-up."""
        jax.block_until_ready(jax.device_put(src, s_dev))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(jax.device_put(src, s_dev))
            times.append(time.perf_counter() - t0)
        return sum(a.nbytes for a in jax.tree.leaves(src)) / float(np.median(times))

    # The runtime keeps many expert-sized copies in flight, which the link serves faster than one large copy (~55
    # against ~48 GB/s on the H200): the ceiling is the better of the two.
    one = jax.device_put(np.ones(h2d_bytes // 4, np.float32), s_host)
    parts = [jax.device_put(np.ones(h2d_bytes // 16 // 4, np.float32), s_host) for _ in range(16)]
    h2d = max(copy_rate(one), copy_rate(parts))
    hbm = None
    if dev.platform == "gpu":
        x = jax.device_put(np.ones((h2d_bytes // 4,), np.float32), s_dev)
        copy = jax.jit(lambda a: a + 0)
        jax.block_until_ready(copy(x))
        t0 = time.perf_counter()
        for _ in range(10):
            y = copy(x)
        jax.block_until_ready(y)
        hbm = 2 * h2d_bytes * 10 / (time.perf_counter() - t0)
    cold = drop_page_cache() if cold else False
    shards = sorted(glob.glob(os.path.join(store_path, "experts", "*", "*", "packed", "**", "*"), recursive=True),
                    key=os.path.getsize)
    files = [f for f in shards if os.path.isfile(f)][-DISK_READERS * 2:]
    return Ceilings(h2d=h2d, disk=read_rate(files), hbm=hbm, cold=cold)


DISK_READERS = 8      # concurrent whole-file readers for the disk ceiling (the runtime's TensorStore reads keep up to
                      # 64 file reads in flight; one sequential reader understated the disk the runtime saw)


def read_rate(files: list[str]) -> float:
    """Bytes per second reading `files` whole with DISK_READERS threads at once (the runtime's loader reads experts
    concurrently; one sequential reader measured 1.3 GB/s on the H200 machine's disk where the loader achieved 1.9)."""
    def read(fn: str) -> int:
        n = 0
        with open(fn, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                n += len(chunk)
        return n

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(DISK_READERS) as pool:
        nbytes = sum(pool.map(read, files))
    return nbytes / max(time.perf_counter() - t0, 1e-9)


def _log(msg: str) -> None:
    """Progress of a bench run on stderr with wall-clock time (a long GPU run shows where its minutes went)."""
    print(f"[dsjax bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(spans) -> float:
    return sum(b - a for a, b in spans)


def _intersection(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two disjoint sorted span lists."""
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def _memcpy_bytes(e: dict) -> int:
    for part in str(e.get("args", {}).get("memcpy_details", "")).split():
        if part.startswith("size:"):
            return int(part[5:])
    return 0


def gpu_events(trace_dir: str) -> list[dict[str, Any]]:
    """The GPU's complete events ("X": kernels, memcpys, memsets; ts/dur in microseconds) of the first jax.profiler
    trace under `trace_dir`; [] when there is no trace or it has no GPU."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        return []
    with gzip.open(paths[0]) as f:
        events = json.load(f)["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]


def is_kernel(e: dict[str, Any]) -> bool:
    return "Memcpy" not in e["name"] and "Memset" not in e["name"]


def trace_timeline(trace_dir: str, bin_ms: float = 5.0) -> dict[str, Any] | None:
    """What the GPU did during a jax.profiler trace: the union of kernel time, of host->GPU copy time, how much of
    the copy time ran while a kernel ran (overlap), the copied bytes, and per-bin series (kernel busy fraction,
    host->GPU GB/s) for plots. Times in seconds from the first GPU event; None when the trace has no GPU."""
    gpu = gpu_events(trace_dir)
    if not gpu:
        return None
    kernels = _union([(e["ts"], e["ts"] + e["dur"]) for e in gpu if is_kernel(e)])
    h2d_ev = [e for e in gpu if e["name"] == "MemcpyH2D"]
    h2d = _union([(e["ts"], e["ts"] + e["dur"]) for e in h2d_ev])
    t0 = min(e["ts"] for e in gpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu)
    n = max(1, int(np.ceil((t1 - t0) / (bin_ms * 1e3))))
    busy, moved = np.zeros(n), np.zeros(n)
    edges = t0 + np.arange(n + 1) * bin_ms * 1e3

    def spread(a: float, b: float, into: np.ndarray, weight: float) -> None:
        for k in range(int((a - t0) // (bin_ms * 1e3)), min(n, int((b - t0) // (bin_ms * 1e3)) + 1)):
            part = max(0.0, min(b, edges[k + 1]) - max(a, edges[k]))
            into[k] += weight * part / max(b - a, 1e-9) if weight else part

    for a, b in kernels:
        spread(a, b, busy, 0.0)
    for e in h2d_ev:
        spread(e["ts"], e["ts"] + e["dur"], moved, float(_memcpy_bytes(e)))
    return {"span_s": (t1 - t0) / 1e6, "kernel_s": _length(kernels) / 1e6, "h2d_s": _length(h2d) / 1e6,
            "h2d_bytes": int(sum(_memcpy_bytes(e) for e in h2d_ev)),
            "h2d_overlapped_s": _intersection(kernels, h2d) / 1e6,
            "bin_ms": bin_ms, "kernel_busy": (busy / (bin_ms * 1e3)).round(4).tolist(),
            "h2d_GB_s": (moved / (bin_ms * 1e-3) / GB).round(3).tolist()}


def gpu_busy_fraction(trace_dir: str, wall_s: float) -> float | None:
    """Union of GPU kernel time over the profiled wall time, from a jax.profiler trace (None without a GPU)."""
    return _busy(trace_timeline(trace_dir), wall_s)


def _busy(timeline: dict[str, Any] | None, wall_s: float) -> float | None:
    return None if not timeline or timeline["kernel_s"] == 0 else min(1.0, timeline["kernel_s"] / wall_s)


def run_config(store: str, name: str, kw: dict[str, Any], batches: list[int], prompt_len: int, tokens: int,
               ceilings: Ceilings, dtype: str, trace: bool, trace_dir: str | None = None,
               on_row=None, cold: bool = False, warmup_tokens: int = 2) -> list[dict[str, Any]]:
    import dsjax
    rows = []
    t0 = time.perf_counter()
    engine = dsjax.load(store, dtype=dtype, **kw)
    pre = engine.stats().get("preloaded_experts") or {}
    _log(f"{name}: loaded in {time.perf_counter() - t0:.1f} s (experts preloaded: {pre.get('host', 0)} host, "
         f"{pre.get('gpu', 0)} GPU in {pre.get('seconds', 0):.1f} s)")
    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    for B in batches:
        prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(B)]
        t0 = time.perf_counter()
        # compile this batch shape; a longer warm-up lets the trials (copies ahead, the CPU path) reach their verdicts
        engine.generate(prompts, max_new_tokens=warmup_tokens, stop_token_ids=())
        _log(f"{name} b{B}: warm-up (compiles) {time.perf_counter() - t0:.1f} s")
        if cold:
            drop_page_cache()        # each measured generation starts from a cold disk (host cache stays)
        s0 = engine.stats()         # the plain engine (config hbm) reports timings only: no links, caches, prediction
        before = s0.get("phase_bytes", {}).get("decode", {})
        t0 = time.perf_counter()
        engine.generate(prompts, max_new_tokens=tokens, stop_token_ids=())
        _log(f"{name} b{B}: measured generation {time.perf_counter() - t0:.1f} s")
        s = engine.stats()
        stall = s.get("stall_seconds", 0.0) - s0.get("stall_seconds", 0.0)
        h0, h1 = s0.get("host_seconds", {}).get("decode", {}), s.get("host_seconds", {}).get("decode", {})
        c0, c1 = s0.get("host_cpu_seconds", {}).get("decode", {}), s.get("host_cpu_seconds", {}).get("decode", {})
        g = s.get("generation", s)          # the plain engine's stats are the generation's
        steps = max(tokens - 1, 1)
        after = s.get("phase_bytes", {}).get("decode", {})
        per_step = {k: (after.get(k, 0) - before.get(k, 0)) / steps for k in after}
        t_step = g["decode_s"] / steps
        roof = {"host->GPU": per_step.get("host->GPU", 0) / ceilings.h2d,
                "disk->host": per_step.get("disk->host", 0) / ceilings.disk}
        bound = max(roof.values()) if roof else 0.0
        rows.append(dict(
            config=name, batch=B, ttft_ms=1e3 * g["ttft_s"], prefill_tok_s=B * prompt_len / g["ttft_s"],
            decode_tok_s=g["decode_tok_s"], step_ms=1e3 * t_step,
            bytes_per_step={k: int(v) for k, v in per_step.items()},
            achieved_GB_s={k: v / t_step / GB for k, v in per_step.items() if k in roof},
            roofline_ms=1e3 * bound, roofline_fraction=(bound / t_step) if bound else None,
            hit_rates=s.get("hit_rates", {}), prediction=s.get("prediction", {}), gpu_busy=None,
            prefetch={k: s.get("prefetch", {}).get(k, 0) - s0.get("prefetch", {}).get(k, 0)
                      for k in ("copies", "used")},          # experts copied ahead during the measured generation
            steps_without_copies_ahead=(s.get("steps_without_copies_ahead", 0)     # adaptive: link saturated
                                        - s0.get("steps_without_copies_ahead", 0)),
            copy_ahead_trial=s.get("copy_ahead_trial", {}).get(str(pow2_bucket(B))),
            copy_ahead_limit=s.get("copy_ahead_limit"),
            copy_ahead_samples=[x for x in s.get("copy_ahead_samples", []) if x["rows"] <= B],   # last steps logged
            stall_s=stall, host_ms_per_step={k: 1e3 * (v - h0.get(k, 0.0)) / steps for k, v in h1.items()},
            # the engine thread's CPU time (waits excluded) per step: "step" is all of it, the rest by activity
            host_cpu_ms_per_step={k: 1e3 * (v - c0.get(k, 0.0)) / steps for k, v in c1.items()},
            moe_layers=len(getattr(engine, "moe_layers", ()) or ()),
            predicted_tok_s=s.get("predicted_tok_s") if B == 1 else None, trace=None,   # the plan is batch 1
            cpu_experts=_cpu_per_step(s0.get("cpu_experts", {}), s.get("cpu_experts", {}), steps),
            process_memory=process_memory(),         # resident now / at peak, against the host budget
            gpu_memory=device_memory(getattr(engine, "device", None)),   # the GPU allocator's bytes now / peak
            parallel=_parallel_row(s0.get("parallel"), s.get("parallel")),
            expert_devices=_expert_devices_row(s0.get("expert_devices"), s.get("expert_devices"), steps)))
        if on_row:
            on_row(rows[-1])         # saved before the traced run: a failure there keeps the measured row
        if trace:
            if trace_dir:
                tdir = os.path.join(trace_dir, f"{name}_b{B}")
                os.makedirs(tdir, exist_ok=True)
            else:
                tdir = tempfile.mkdtemp(prefix="dsjax-bench-trace-")
            t0 = time.perf_counter()
            with jax.profiler.trace(tdir):
                engine.generate(prompts, max_new_tokens=4, stop_token_ids=())
            wall = time.perf_counter() - t0
            timeline = trace_timeline(tdir)
            _log(f"{name} b{B}: traced generation {wall:.1f} s, trace read in {time.perf_counter() - t0 - wall:.1f} s")
            if timeline:
                timeline["wall_s"] = wall
            rows[-1].update(gpu_busy=_busy(timeline, wall), trace=timeline)
            if on_row:
                on_row(None)
    engine.close()
    return rows


def _parallel_row(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """Expert parallelism in the measured generation: per device its experts, their bytes, every weight byte it holds
    and the assignments it computed (with their share: the load balance), and the totals; None on one device."""
    if not after:
        return None
    per = []
    for b, a in zip(before["per_device"], after["per_device"]):
        per.append({k: a[k] for k in ("device", "process", "experts", "expert_bytes", "weight_bytes",
                                      "peak_bytes_in_use")} | {"assignments": a["assignments"] - b["assignments"]})
    total = sum(d["assignments"] for d in per)
    for d in per:
        d["assignment_share"] = d["assignments"] / total if total else None
    mean = total / len(per)
    return {"devices": after["devices"], "per_device": per,
            "total": {"experts": sum(d["experts"] for d in per), "expert_bytes": sum(d["expert_bytes"] for d in per),
                      "weight_bytes": sum(d["weight_bytes"] for d in per), "assignments": total},
            "imbalance": max(d["assignments"] for d in per) / mean if mean else None}


def _expert_devices_row(before: dict[str, Any] | None, after: dict[str, Any] | None,
                        steps: int) -> list[dict[str, Any]] | None:
    """Tiered expert parallelism in the measured generation: per device its experts, host->GPU MB per step over its
    own link, GPU slots and hit rate; None on one device."""
    if not after or after.get("count", 1) < 2:
        return None
    out = []
    for b, a in zip(before["per_device"], after["per_device"]):
        hits, misses = a["gpu_hits"] - b["gpu_hits"], a["gpu_misses"] - b["gpu_misses"]
        out.append({"device": a["device"], "experts": a["experts"], "gpu_slots": a["gpu_slots"],
                    "h2d_MB_per_step": (a["bytes"].get("host->GPU", 0) - b["bytes"].get("host->GPU", 0)) / 1e6 / steps,
                    "gpu_hit_rate": hits / (hits + misses) if hits + misses else None})
    return out


def _cpu_ms_cell(cpu_ms: dict, moe_layers: int) -> str:
    """The engine thread's CPU ms per step and per MoE layer, less the CPU experts' kernel (which that thread also
    runs, in "cpu_experts_wait": compute, not host work)."""
    work = cpu_ms.get("step", 0.0) - cpu_ms.get("cpu_experts_wait", 0.0)
    return f"{work:.1f}" + (f" ({work / moe_layers:.2f})" if moe_layers else "")


def _cpu_trial_cell(cp: dict[str, Any], batch: int) -> str:
    """'; trial W/O ms: cpu|copies' for the row's decode bucket under cpu_experts auto, else ''."""
    tr = (cp.get("trial") or {}).get(str(pow2_bucket(batch)))
    if not tr or not tr.get("ms_with") or not tr.get("ms_without"):
        return ""
    return f"; trial {tr['ms_with']:.1f}/{tr['ms_without']:.1f} ms: {'cpu' if tr['cpu_wins'] else 'copies'}"


def _cpu_per_step(before: dict[str, Any], after: dict[str, Any], steps: int) -> dict[str, Any] | None:
    """The CPU expert path during the measured generation: experts per decode step, the kernel's GB/s and ms per
    step, the engine thread's wait for it per step; None when the path was off."""
    if not after.get("enabled"):
        return None
    d = {k: after.get(k, 0) - before.get(k, 0) for k in ("experts", "bytes", "seconds", "wait_seconds")}
    trial_steps = {k: after.get("trial_steps", {}).get(k, 0) - before.get("trial_steps", {}).get(k, 0)
                   for k in ("with", "without")}
    return {"experts_per_step": d["experts"] / steps, "GB_s": d["bytes"] / d["seconds"] / GB if d["seconds"] else None,
            "ms_per_step": 1e3 * d["seconds"] / steps, "wait_ms_per_step": 1e3 * d["wait_seconds"] / steps,
            "mode": after.get("mode"), "trial": after.get("trial") or None, "trial_steps": trial_steps}


def bench(store: str, *, gpu_memory=None, host_memory=None, preset: str | None = None,
          batches=(1, 8, 32), prompt_len: int = 64, tokens: int = 16, dtype: str = "bfloat16",
          configs=("budget", "resident", "on_demand"), cold: bool = False, trace: bool | tuple[str, ...] = True,
          out: str | None = None, trace_dir: str | None = None, devices: int | None = None, warmup_tokens: int = 2,
          **overrides) -> dict[str, Any]:
    """Measure `store` under the budgets (config 'budget'), with no limit ('resident'), with overlap_io off
    ('on_demand'), under the budgets with cpu_experts on ('cpu'; budget and on_demand run with it off unless an
    override sets it) or auto ('cpu_auto': the CPU trial decides per batch bucket) or as a plain in-memory model
    ('hbm'); returns {'ceilings', 'rows', 'machine'}. With `out`, every row is written to that JSON file as it is
    measured and a rerun with the same `out` resumes: rows already there are kept, not measured again (the
    ceilings are those of the first run). `trace`: profile every config (True), none, or the configs named. With
    `trace_dir`, each row's profiler trace is kept there. `devices` N > 1: config 'hbm' runs every weight resident
    with the experts split over N devices and each row adds 'parallel' (per device: experts, bytes, assignments in
    the measured generation); budget and on_demand run tiered expert parallelism (each device its own expert slots,
    host cache and link; the budgets apply to each device) and each row adds 'expert_devices' (per device: host->GPU
    bytes per step, GPU hit rate); 'resident' and 'cpu' run on one device."""
    if tokens < 1 or warmup_tokens < 1:           # before measuring or loading anything
        raise ValueError(f"bench needs --tokens >= 1 and --warmup-tokens >= 1, got {tokens} and {warmup_tokens}")
    several = devices if devices and devices > 1 else None
    if several and (cpu := [c for c in configs if c in ("cpu", "cpu_auto")]):
        raise ValueError(f"bench over {devices} devices: config {cpu[0]} (CPU-computed experts) runs on one device; "
                         "drop it from --configs")
    tiered = [c for c in configs if c in ("budget", "on_demand", "cpu", "cpu_auto")]
    if tiered and not several and (gpu_memory is not None or host_memory is not None):
        # before the first jax.devices() (the links are measured before any engine loads): the pinned pool capped
        # near what the tiered configs' plan pins, as dsjax.load caps it for a process's first engine
        from dsjax.runtime.load import pinned_need
        from dsjax.runtime.memory import cap_pinned_host
        opts = {k: v for k, v in overrides.items() if k not in ("cpu_experts", "overlap_io")}
        cap_pinned_host(max(pinned_need(store, dtype, preset=preset, gpu_memory=gpu_memory, host_memory=host_memory,
                                        overlap_io=io, **opts) for io in (True, False)))
    dev = jax.devices()[0]
    result: dict[str, Any] = {}
    if out and os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
    if "ceilings" in result:
        ceilings = Ceilings(**result["ceilings"])
    else:
        t0 = time.perf_counter()
        ceilings = measure_ceilings(store, cold)
        _log(f"ceilings measured in {time.perf_counter() - t0:.1f} s: host->GPU {ceilings.h2d / GB:.1f} GB/s, "
             f"disk {ceilings.disk / GB:.2f} GB/s")
    result.update({"machine": f"{dev.platform} {dev.device_kind}", "ceilings": dataclasses.asdict(ceilings),
                   "date": time.strftime("%Y-%m-%d"), "store": os.path.abspath(store)})
    result.setdefault("rows", [])

    def save(row: dict[str, Any] | None = None) -> None:
        if row is not None:
            result["rows"].append(row)
        if out:
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, out)
    budget = {k: v for k, v in (("gpu_memory", gpu_memory), ("host_memory", host_memory), ("preset", preset))
              if v is not None}
    # the tiered configs plan with the ceilings just measured, so each row's predicted_tok_s is this machine's
    links = Links(h2d=ceilings.h2d, disk=ceilings.disk, hbm=ceilings.hbm or Links().hbm, measured=True)
    # budget and on_demand are GPU-only (cpu_experts off, as before that path existed) unless --set says otherwise;
    # cpu is the budget config with host-resident experts computed on the CPU beside the copies (issue 24)
    gpu_only = {"cpu_experts": "off", **overrides}
    per_device = {"devices": several} if several else {}
    kws = {"budget": dict(budget, links=links, **gpu_only, **per_device), "resident": {"links": links},
           "on_demand": dict(budget, links=links, **dict(gpu_only, overlap_io=False), **per_device),
           "hbm": {"devices": devices} if devices and devices > 1 else {"in_memory": True},
           "cpu": dict(budget, links=links, **dict(overrides, cpu_experts="on")),
           "cpu_auto": dict(budget, links=links, **dict(overrides, cpu_experts="auto"))}
    save()
    for name in configs:
        done = {r["batch"] for r in result["rows"] if r["config"] == name}
        todo = [b for b in batches if b not in done]
        if todo:
            traced = trace if isinstance(trace, bool) else name in trace
            run_config(store, name, kws[name], todo, prompt_len, tokens, ceilings, dtype, traced, trace_dir, save,
                       cold, warmup_tokens)
    order = {(c, b): i for i, (c, b) in enumerate((c, b) for c in configs for b in batches)}
    result["rows"].sort(key=lambda r: order.get((r["config"], r["batch"]), len(order)))
    save()
    return result


def markdown(result: dict[str, Any]) -> str:
    c = result["ceilings"]
    hbm = f"{c['hbm'] / GB:.0f} GB/s" if c["hbm"] else "n/a"
    lines = [f"machine {result['machine']}, {result['date']}; ceilings measured in this run: host->GPU "
             f"{c['h2d'] / GB:.1f} GB/s, disk {c['disk'] / GB:.2f} GB/s ({'cold' if c['cold'] else 'warm'}), "
             f"HBM {hbm}",
             "",
             "| config | batch | TTFT ms | prefill tok/s | decode tok/s | step ms | host->GPU MB/step | disk MB/step "
             "| achieved GB/s (h2d / disk) | I/O roofline ms | of roofline | hit GPU/host "
             "| pred P/R (copied ahead: used/copies; trial ms/step with/without copies ahead: winner) | GPU busy "
             "| copy time under compute | host ms/step: routing sync / expert copies / dispatch "
             "| engine thread CPU ms/step (per MoE layer, CPU experts' kernel excluded) "
             "| CPU experts/step (kernel GB/s, ms/step; auto: trial ms/step with/without: winner) "
             "| process RSS GB (peak so far) | GPU GB in use (peak so far) | planned tok/s (batch 1, these ceilings) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b, a = r["bytes_per_step"], r["achieved_GB_s"]
        hit = r["hit_rates"]
        pr = r["prediction"]
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['ttft_ms']:.1f} | {r['prefill_tok_s']:.1f} | "
            f"{r['decode_tok_s']:.2f} | {r['step_ms']:.1f} | {b.get('host->GPU', 0) / 1e6:.1f} | "
            f"{b.get('disk->host', 0) / 1e6:.1f} | {a.get('host->GPU', 0):.2f} / {a.get('disk->host', 0):.2f} | "
            f"{r['roofline_ms']:.2f} | "
            + (f"{r['roofline_fraction']:.0%}" if r["roofline_fraction"] else "-") + " | "
            + (f"{hit.get('gpu', 1):.2f}/{hit.get('host', 1):.2f}" if hit else "all GPU") + " | "
            + (f"{pr['precision']:.2f}/{pr['recall']:.2f}" if pr.get("precision") is not None else "-")
            + (f" ({pf['used']}/{pf['copies']})" if (pf := r.get("prefetch")) and pf.get("copies") else "")
            + (f"; trial {tr['ms_with']:.1f}/{tr['ms_without']:.1f} ms: {'ahead' if tr['copies_ahead_win'] else 'on demand'}"
               if (tr := r.get("copy_ahead_trial")) and tr.get("ms_with") and tr.get("ms_without") else "")
            + " | "
            + (f"{r['gpu_busy']:.0%}" if r["gpu_busy"] is not None else "-") + " | "
            + (f"{t['h2d_overlapped_s'] / t['h2d_s']:.0%}" if (t := r.get("trace")) and t["h2d_s"] else "-") + " | "
            + ("/".join(f"{h.get(k, 0):.1f}" for k in ("routing_sync", "expert_copies", "dispatch"))
               if (h := r.get("host_ms_per_step")) else "-") + " | "
            + (_cpu_ms_cell(c, r.get("moe_layers", 0)) if (c := r.get("host_cpu_ms_per_step")) else "-") + " | "
            + (f"{cp['experts_per_step']:.1f} ({cp['GB_s'] or 0:.1f}, {cp['ms_per_step']:.1f})"
               + _cpu_trial_cell(cp, r["batch"]) if (cp := r.get("cpu_experts")) else "-") + " | "
            + (f"{m['rss'] / GB:.1f} ({m['peak_rss'] / GB:.1f})"
               if (m := r.get("process_memory")) and m.get("rss") and m.get("peak_rss") else "-") + " | "
            + (f"{g['in_use'] / GB:.2f} ({g['peak'] / GB:.2f})"
               if (g := r.get("gpu_memory")) and g.get("in_use") is not None and g.get("peak") is not None else "-")
            + " | "
            + (f"{r['predicted_tok_s']:.2f}" if r.get("predicted_tok_s") else "-") + " |")
    tiered = [r for r in result["rows"] if r.get("expert_devices")]
    if tiered:
        lines += ["", "| config | batch | device | experts | GPU slots | host->GPU MB/step (own link) | GPU hit rate |",
                  "|---|---|---|---|---|---|---|"]
        for r in tiered:
            for d in r["expert_devices"]:
                hit = f"{d['gpu_hit_rate']:.2f}" if d["gpu_hit_rate"] is not None else "-"
                lines.append(f"| {r['config']} | {r['batch']} | {d['device']} | {d['experts']} | {d['gpu_slots']} | "
                             f"{d['h2d_MB_per_step']:.1f} | {hit} |")
    par = [r for r in result["rows"] if r.get("parallel")]
    if par:
        lines += ["", "| config | batch | device | experts | expert MB | weight MB | assignments (share) |",
                  "|---|---|---|---|---|---|---|"]
        for r in par:
            p = r["parallel"]
            for d in p["per_device"]:
                share = f" ({d['assignment_share']:.1%})" if d["assignment_share"] is not None else ""
                lines.append(f"| {r['config']} | {r['batch']} | {d['device']} | {d['experts']} | "
                             f"{d['expert_bytes'] / 1e6:.1f} | {d['weight_bytes'] / 1e6:.1f} | "
                             f"{d['assignments']}{share} |")
            t = p["total"]
            imb = f", busiest / mean {p['imbalance']:.2f}" if p["imbalance"] else ""
            lines.append(f"| {r['config']} | {r['batch']} | all {p['devices']} | {t['experts']} | "
                         f"{t['expert_bytes'] / 1e6:.1f} | {t['weight_bytes'] / 1e6:.1f} | {t['assignments']}{imb} |")
    return "\n".join(lines)

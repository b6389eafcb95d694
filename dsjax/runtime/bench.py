"""`dsjax bench`: what a store does under budgets, against the ceilings of the machine measured in the same run.

For each configuration (the given budgets; everything resident; load on demand) and batch size it measures time to
first token, prefill and decode tokens/s, the bytes each decode step moved per link, each link's achieved rate
against its measured ceiling, the I/O roofline (bytes per link / ceiling, links overlapped) and how close decode got
to it, hit rates per tier, prediction precision/recall and, on a GPU, the busy fraction from a profiler trace.
Owns measuring and reporting; the engine and planner are used as they are.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import subprocess
import tempfile
import time
from typing import Any

import jax
import numpy as np

GB = 1e9


@dataclasses.dataclass
class Ceilings:
    h2d: float          # pinned host -> device, bytes/s
    disk: float         # sequential read of a store shard, bytes/s
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
    s_dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    s_host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    host = jax.device_put(np.ones(h2d_bytes // 4, np.float32), s_host)
    jax.block_until_ready(jax.device_put(host, s_dev))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(host, s_dev))
        times.append(time.perf_counter() - t0)
    h2d = h2d_bytes / float(np.median(times))
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
    files = [f for f in shards if os.path.isfile(f)][-4:]
    nbytes, t0 = 0, time.perf_counter()
    for fn in files:
        with open(fn, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                nbytes += len(chunk)
    disk = nbytes / max(time.perf_counter() - t0, 1e-9)
    return Ceilings(h2d=h2d, disk=disk, hbm=hbm, cold=cold)


def gpu_busy_fraction(trace_dir: str, wall_s: float) -> float | None:
    """Union of GPU kernel time over the profiled wall time, from a jax.profiler trace (None without a GPU)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        return None
    events = json.load(gzip.open(paths[0]))["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["pid"] in gpu_pids
                   and "Memcpy" not in e["name"] and "Memset" not in e["name"])
    if not spans:
        return None
    busy, end = 0.0, -1.0
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return min(1.0, busy / 1e6 / wall_s)


def run_config(store: str, name: str, kw: dict[str, Any], batches: list[int], prompt_len: int, tokens: int,
               ceilings: Ceilings, dtype: str, trace: bool) -> list[dict[str, Any]]:
    import dsjax
    rows = []
    engine = dsjax.load(store, dtype=dtype, **kw)
    rng = np.random.default_rng(0)
    vocab = engine.config.vocab_size
    for B in batches:
        prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(B)]
        engine.generate(prompts, max_new_tokens=2, stop_token_ids=())             # compile this batch shape
        before = engine.stats()["phase_bytes"].get("decode", {})
        engine.generate(prompts, max_new_tokens=tokens, stop_token_ids=())
        s = engine.stats()
        g = s["generation"]
        steps = max(tokens - 1, 1)
        after = s["phase_bytes"].get("decode", {})
        per_step = {k: (after.get(k, 0) - before.get(k, 0)) / steps for k in after}
        t_step = g["decode_s"] / steps
        roof = {"host->GPU": per_step.get("host->GPU", 0) / ceilings.h2d,
                "disk->host": per_step.get("disk->host", 0) / ceilings.disk}
        bound = max(roof.values()) if roof else 0.0
        busy = None
        if trace:
            tdir = tempfile.mkdtemp(prefix="dsjax-bench-trace-")
            t0 = time.perf_counter()
            with jax.profiler.trace(tdir):
                engine.generate(prompts, max_new_tokens=4, stop_token_ids=())
            busy = gpu_busy_fraction(tdir, time.perf_counter() - t0)
        rows.append(dict(
            config=name, batch=B, ttft_ms=1e3 * g["ttft_s"], prefill_tok_s=B * prompt_len / g["ttft_s"],
            decode_tok_s=g["decode_tok_s"], step_ms=1e3 * t_step,
            bytes_per_step={k: int(v) for k, v in per_step.items()},
            achieved_GB_s={k: v / t_step / GB for k, v in per_step.items() if k in roof},
            roofline_ms=1e3 * bound, roofline_fraction=(bound / t_step) if bound else None,
            hit_rates=s["hit_rates"], prediction=s["prediction"], gpu_busy=busy,
            predicted_tok_s=s["predicted_tok_s"]))
    engine.close()
    return rows


def bench(store: str, *, gpu_memory=None, host_memory=None, preset: str | None = None,
          batches=(1, 8, 32), prompt_len: int = 64, tokens: int = 16, dtype: str = "bfloat16",
          configs=("budget", "resident", "on_demand"), cold: bool = False, trace: bool = True,
          **overrides) -> dict[str, Any]:
    """Measure `store` under the budgets (config 'budget'), with no limit ('resident') and with overlap_io off
    ('on_demand'); returns {'ceilings', 'rows', 'machine'}."""
    ceilings = measure_ceilings(store, cold)
    budget = {k: v for k, v in (("gpu_memory", gpu_memory), ("host_memory", host_memory), ("preset", preset))
              if v is not None}
    kws = {"budget": dict(budget, **overrides), "resident": {},
           "on_demand": dict(budget, **dict(overrides, overlap_io=False))}
    rows = []
    for name in configs:
        rows += run_config(store, name, kws[name], list(batches), prompt_len, tokens, ceilings, dtype, trace)
    dev = jax.devices()[0]
    return {"machine": f"{dev.platform} {dev.device_kind}", "ceilings": dataclasses.asdict(ceilings), "rows": rows,
            "date": time.strftime("%Y-%m-%d"), "store": os.path.abspath(store)}


def markdown(result: dict[str, Any]) -> str:
    c = result["ceilings"]
    hbm = f"{c['hbm'] / GB:.0f} GB/s" if c["hbm"] else "n/a"
    lines = [f"machine {result['machine']}, {result['date']}; ceilings measured in this run: host->GPU "
             f"{c['h2d'] / GB:.1f} GB/s, disk {c['disk'] / GB:.2f} GB/s ({'cold' if c['cold'] else 'warm'}), "
             f"HBM {hbm}",
             "",
             "| config | batch | TTFT ms | prefill tok/s | decode tok/s | step ms | host->GPU MB/step | disk MB/step "
             "| achieved GB/s (h2d / disk) | I/O roofline ms | of roofline | hit GPU/host | pred P/R | GPU busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
            + (f"{pr['precision']:.2f}/{pr['recall']:.2f}" if pr["precision"] is not None else "-") + " | "
            + (f"{r['gpu_busy']:.0%}" if r["gpu_busy"] is not None else "-") + " |")
    return "\n".join(lines)

"""Metrics: counters and timings of the runtime (seed §5), exported as a dict, Prometheus text and JSON lines.

Owns numbers only: bytes and seconds per link, per-layer compute latency, time stalled waiting for weights,
prediction precision/recall and expert activation counts. Hit rates come from the caches' own counters.
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
from typing import Any


class Metrics:
    def __init__(self, n_layers: int = 0, n_experts: int = 0):
        self._lock = threading.Lock()
        self.link_bytes: dict[str, int] = collections.defaultdict(int)
        self.link_seconds: dict[str, float] = collections.defaultdict(float)
        self.link_count: dict[str, int] = collections.defaultdict(int)
        self.layer_seconds = [0.0] * n_layers
        self.layer_calls = [0] * n_layers
        self.stall_seconds = 0.0
        self.pred_tp = self.pred_fp = self.pred_fn = 0
        self.pred_layers = 0                              # MoE layer runs scored against a prediction
        self.prefetch_used = self.prefetch_unused = 0     # predicted experts copied to the GPU ahead of their layer
        self.prefetch_recopied = 0                        # of them, copied again on demand in the same step (waste)
        self.activations = [[0] * n_experts for _ in range(n_layers)] if n_experts else []
        self.tokens = 0
        self.started = time.perf_counter()
        self.phase = "prefill"               # set by the engine; transfers are also counted per phase
        self.phase_bytes: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
        self.host_seconds: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        # the same activities in CPU time of the thread that ran them (time.thread_time): host *work*, where
        # host_seconds also holds the waits (a routing sync waits for the GPU, and for the copies before it);
        # "forward" is a whole pass over the layers, everything the engine thread did for a step
        self.host_cpu_seconds: dict[str, dict[str, float]] = collections.defaultdict(
            lambda: collections.defaultdict(float))

    @contextlib.contextmanager
    def host(self, activity: str):
        """Time the runtime's host thread spends on `activity` (waiting for routing, issuing copies, bookkeeping):
        where a step's time goes when the GPU is neither copying nor computing. Kept per phase (prefill, decode)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.host_seconds[self.phase][activity] += time.perf_counter() - t0
            self.host_cpu_seconds[self.phase][activity] += time.thread_time() - c0

    def add_transfer(self, link: str, nbytes: int, seconds: float, issued_only: bool = False) -> None:
        """Bytes moved over a link; `issued_only` marks asynchronous copies whose seconds are issue time only."""
        with self._lock:
            self.link_bytes[link] += int(nbytes)
            self.link_count[link] += 1
            self.phase_bytes[self.phase][link] += int(nbytes)
            if not issued_only:
                self.link_seconds[link] += seconds

    def add_layer(self, i: int, seconds: float) -> None:
        self.layer_seconds[i] += seconds
        self.layer_calls[i] += 1

    def add_stall(self, seconds: float) -> None:
        self.stall_seconds += seconds

    def add_prediction(self, predicted: set, actual: set) -> None:
        self.pred_layers += 1
        self.pred_tp += len(predicted & actual)
        self.pred_fp += len(predicted - actual)
        self.pred_fn += len(actual - predicted)

    def add_prefetch(self, used: int, unused: int) -> None:
        self.prefetch_used += used
        self.prefetch_unused += unused

    def add_recopied(self, n: int) -> None:
        self.prefetch_recopied += n

    def add_activations(self, layer: int, experts) -> None:
        row = self.activations[layer]
        for e in experts:
            row[int(e)] += 1

    def snapshot(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            links = {k: {"bytes": self.link_bytes[k], "copies": self.link_count[k],
                         "seconds": self.link_seconds[k],
                         "GB_per_s": (self.link_bytes[k] / self.link_seconds[k] / 1e9)
                         if self.link_seconds[k] else None}
                     for k in sorted(self.link_bytes)}
        p = self.pred_tp + self.pred_fp
        r = self.pred_tp + self.pred_fn
        out = {
            "links": links,
            "stall_seconds": self.stall_seconds,
            "layer_ms": [1e3 * s / n if n else None for s, n in zip(self.layer_seconds, self.layer_calls)],
            "prediction": {"precision": self.pred_tp / p if p else None, "recall": self.pred_tp / r if r else None,
                           "predicted": p, "activated": r, "layers_scored": self.pred_layers},
            "prefetch": {"copies": self.prefetch_used + self.prefetch_unused, "used": self.prefetch_used,
                         "recopied": self.prefetch_recopied,
                         "hit_rate": self.prefetch_used / (self.prefetch_used + self.prefetch_unused)
                         if self.prefetch_used + self.prefetch_unused else None},
            "expert_activations": [list(row) for row in self.activations],     # a copy: the rows keep counting
            "tokens": self.tokens,
            "phase_bytes": {ph: dict(v) for ph, v in self.phase_bytes.items()},
            "host_seconds": {ph: dict(v) for ph, v in self.host_seconds.items()},
            "host_cpu_seconds": {ph: dict(v) for ph, v in self.host_cpu_seconds.items()},
        }
        out.update(extra or {})
        return out


def process_memory() -> dict[str, int | None]:
    """This process's resident memory now and at its peak, bytes (Linux /proc; None elsewhere). The budgets cover
    the tiers the planner places; this is everything the process holds (runtime, allocator caches, staging), to
    compare against host_memory (bench/RESULTS.md, V3 slice run 6: 32-47 GB resident under a 12 GB host budget)."""
    got: dict[str, int | None] = {"rss": None, "peak_rss": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    got["rss" if key == "VmRSS" else "peak_rss"] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return got


def device_memory(device) -> dict[str, int | None]:
    """What `device`'s allocator holds now and at its peak so far, and its limit, bytes (None where the backend does
    not say: the CPU, or no device). The GPU budget covers the pools the planner places; this is everything XLA
    allocated on the device (pools, KV, every call's temporaries: attention's query blocks, a long step's MoE rows),
    to compare against gpu_memory. JAX cannot reset the peak: it covers the process's life."""
    stats = (device.memory_stats() if device is not None else None) or {}
    return {"in_use": stats.get("bytes_in_use"), "peak": stats.get("peak_bytes_in_use"),
            "limit": stats.get("bytes_limit")}


DICT_LABELS = {"links": "link", "pools": "pool", "hit_rates": "tier", "host_seconds": "phase", "host_cpu_seconds": "phase"}
LIST_LABELS = {"layer_ms": ("layer",), "expert_activations": ("layer", "expert")}


NOT_GAUGES = frozenset({"copy_ahead_samples"})    # stats keys that are logs, not gauges (kept out of /metrics)


def prometheus_text(snapshot: dict[str, Any], prefix: str = "dsjax") -> str:
    """Prometheus exposition text of a stats snapshot: numeric leaves become gauges; the keys of `links`, `pools`
    and `hit_rates` and the indices of per-layer lists become labels."""
    lines: list[str] = []

    def emit(name: str, value, labels: dict[str, str]):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{prefix}_{name}{{{lab}}} {value}" if lab else f"{prefix}_{name} {value}")

    def walk(name: str, v, labels: dict[str, str], list_labels: tuple[str, ...] = ()):
        if name in NOT_GAUGES:
            return
        if isinstance(v, dict):
            label = DICT_LABELS.get(name)
            for k, x in v.items():
                if label and label not in labels:
                    walk(name, x, {**labels, label: str(k)})
                else:
                    walk(f"{name}_{k}" if name else str(k), x, labels)
        elif isinstance(v, list):
            names = list_labels or LIST_LABELS.get(name, ("index",))
            for j, x in enumerate(v):
                walk(name, x, {**labels, names[0]: str(j)}, names[1:] or ("index",))
        else:
            emit(name.replace("->", "_to_").replace("-", "_"), v, labels)

    walk("", snapshot, {})
    return "\n".join(lines) + "\n"


def json_line(snapshot: dict[str, Any]) -> str:
    """One JSON object per line (append to a file for a time series)."""
    return json.dumps(dict(snapshot, time=time.time()), separators=(",", ":"))

"""The server's own figures in Prometheus text: request counts by outcome, tokens in and out, latency histograms.

Owns what only the server sees (arrival to first token, gaps between tokens as the client gets them, HTTP outcomes).
Running/waiting requests and the KV pool come from `engine.requests_status()`, step time and batch from the step
counters of `engine.stats()`, and the runtime's figures (hit rates, bytes per link, prediction) are that same
snapshot as `engine.stats_prometheus()` writes it; /metrics concatenates them. Everything here is
touched from the event loop's thread only, so it needs no lock.
"""

from __future__ import annotations

import bisect
import collections
import math
from typing import Any

PREFIX = "dsjax_serve"
# Seconds. TTFT spans a queue wait and a prefill (ms to minutes at V3 scale); gaps between tokens a decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(buckets) + 1)        # the last one is +Inf
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.bounds + (math.inf,), self.counts):
            acc += c
            le = "+Inf" if b == math.inf else repr(float(b))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum}", f"{name}_count{lab} {self.n}"]
        return out


class ServerMetrics:
    def __init__(self):
        self.requests = collections.Counter()          # finished requests (choices) by finish reason
        self.http = collections.Counter()              # answers by status code
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self._last_steps: dict[str, Any] = {}            # the engine's step counters at the previous scrape

    def finished(self, reason: str, completion_tokens: int, e2e_s: float) -> None:
        self.requests[reason] += 1
        self.generation_tokens += completion_tokens
        self.e2e.observe(e2e_s)

    def step_figures(self, steps: dict[str, Any] | None) -> tuple[float, float] | None:
        """Mean step time and mean batch (decode rows + prefill chunks per step) since the previous scrape, from the
        engine's cumulative step counters (the engine reports no per-step samples, so no histogram)."""
        if not steps:
            return None
        last, self._last_steps = self._last_steps, dict(steps)
        n = steps.get("steps", 0) - last.get("steps", 0)
        if n <= 0:
            return 0.0, 0.0
        dt = steps.get("step_seconds", 0.0) - last.get("step_seconds", 0.0)
        rows = steps.get("decode_rows", 0) - last.get("decode_rows", 0)
        return dt / n, rows / n

    def prometheus(self, status: dict[str, Any] | None, steps: dict[str, Any] | None = None,
                   engine_text: str = "", warmup: dict[str, Any] | None = None) -> str:
        p = PREFIX
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} {kind}", *samples])

        if warmup is not None:                   # Readiness.report() of a server that warms up
            metric("ready", "gauge", "1 once the warm-up has ended (the server answers requests)",
                   [f"{p}_ready {int(warmup['ready'])}"])
            metric("warmup_step_shapes_done", "gauge", "step shapes the warm-up has compiled",
                   [f"{p}_warmup_step_shapes_done {warmup['step_shapes_done']}"])
        if status is not None:
            metric("requests_running", "gauge", "requests in the engine's running batch",
                   [f"{p}_requests_running {status.get('running', 0)}"])
            metric("requests_waiting", "gauge", "requests submitted and not yet running (queued for a KV row)",
                   [f"{p}_requests_waiting {status.get('waiting', 0)}"])
            fin = status.get("finished", {})
            metric("engine_requests_finished_total", "counter", "requests the engine finished, by reason",
                   [f'{p}_engine_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(fin.items())])
            kv = status.get("kv", {})
            for k, v in sorted(kv.items()):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metric(f"kv_{k}", "gauge", f"the engine's KV pool: {k}", [f"{p}_kv_{k} {v}"])
            total, used = kv.get("pages", kv.get("rows", 0)), kv.get("pages_used", kv.get("rows_used", 0))
            metric("kv_usage_ratio", "gauge", "fraction of the KV pool in use",
                   [f"{p}_kv_usage_ratio {used / total if total else 0.0}"])
        metric("requests_finished_total", "counter", "choices the server finished, by finish reason",
               [f'{p}_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.requests.items())])
        metric("http_responses_total", "counter", "answers by HTTP status",
               [f'{p}_http_responses_total{{code="{c}"}} {n}' for c, n in sorted(self.http.items())])
        metric("prompt_tokens_total", "counter", "prompt tokens of admitted requests",
               [f"{p}_prompt_tokens_total {self.prompt_tokens}"])
        metric("generation_tokens_total", "counter", "tokens generated", [f"{p}_generation_tokens_total "
                                                                          f"{self.generation_tokens}"])
        metric("time_to_first_token_seconds", "histogram", "arrival to first token (queue wait + prefill)",
               self.ttft.lines(f"{p}_time_to_first_token_seconds"))
        metric("inter_token_latency_seconds", "histogram", "gap between consecutive tokens of a request",
               self.itl.lines(f"{p}_inter_token_latency_seconds"))
        metric("e2e_request_latency_seconds", "histogram", "arrival to last token",
               self.e2e.lines(f"{p}_e2e_request_latency_seconds"))
        figures = self.step_figures(steps)
        if figures is not None:
            metric("step_seconds_mean", "gauge", "mean engine step time since the previous scrape",
                   [f"{p}_step_seconds_mean {figures[0]}"])
            metric("decode_batch_mean", "gauge", "mean decode rows per engine step since the previous scrape",
                   [f"{p}_decode_batch_mean {figures[1]}"])
            metric("steps_total", "counter", "engine steps", [f"{p}_steps_total {steps.get('steps', 0)}"])
        text = "\n".join(lines) + "\n"
        return text + engine_text if engine_text else text

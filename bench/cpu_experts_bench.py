"""The CPU expert kernel (dsjax/runtime/cpu_experts.py) against the host's RAM read bandwidth (issue 24).

    python bench/cpu_experts_bench.py --out bench/results/cpu_experts.json            # the GPU machine's host
    python bench/cpu_experts_bench.py --quick                                          # any machine, small

Measures, by thread count:
- RAM read bandwidth: numpy sums over a buffer of --ram-gb (default 4 GB), split over Python threads (numpy releases
  the GIL in reductions), median of --repeats passes, after one pass that touches every page;
- the kernel: cpu_expert_rows on --experts experts (default 8, DeepSeek-V3 shapes: hidden 7168, moe_intermediate
  2048, NVFP4 gate/up [2048, 7168], down [7168, 2048]) for 1, 2, 4 and 8 rows, every row routed to all of them
  (bytes fixed, rows multiply the arithmetic). Each call takes the next experts of a pool of --pool buffers (default
  48, ~1.2 GB at V3 shapes), so weights come from RAM, not the last-level cache, as in decode where every layer
  brings other experts. GB/s = packed codes + scales of the experts / median seconds per call (after 2 warm-up
  calls); the fraction of RAM read bandwidth is against the best RAM figure of any thread count;
- the fixed cost of one call (1 tiny expert, 1 row), which the policy pays per layer.
Weights are random bytes with valid scales: the kernel's work does not depend on the values.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from dsjax.runtime import cpu_experts  # noqa: E402
from dsjax.runtime.expert_layout import ALIGN, ExpertLayout, Part  # noqa: E402

BLOCKS = {"nvfp4": 16, "mxfp4": 32}


def expert_layout(fmt: str, hidden: int, inter: int) -> ExpertLayout:
    """The store's layout of one routed expert (gate/up [inter, hidden], down [hidden, inter]) in `fmt`."""
    parts, offset = [], 0
    for proj, (n, k) in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
        for field, shape, dtype in (("packed", (n, k // 2), "uint8"), ("scales", (n, k // BLOCKS[fmt]), "uint8"),
                                    ("global_scale", (), "float32")):
            parts.append(Part(proj, field, offset, shape, dtype))
            offset += -(-parts[-1].nbytes // ALIGN) * ALIGN
    return ExpertLayout(tuple(parts), tuple((p, fmt) for p in ("gate", "up", "down")), offset)


def expert_buffers(layout: ExpertLayout, fmt: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` distinct flat expert buffers: random codes, scales of moderate size, a global scale of 1e-3."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, layout.nbytes, dtype=np.uint8)
    out = []
    for i in range(count):
        buf = base ^ np.uint8(i)                          # distinct bytes, page-touched
        for p in layout.parts:
            view = buf[p.offset:p.offset + p.nbytes]
            if p.field == "scales":                       # E4M3 0x28..0x47 (2^-2..2^1.9), E8M0 2^-4..2^3
                lo, hi = (0x28, 0x48) if fmt == "nvfp4" else (123, 131)
                view[:] = lo + view % (hi - lo)
            elif p.field == "global_scale":
                view.view(np.float32)[0] = 1e-3
        out.append(buf)
    return out


def ram_read_gbps(buf: np.ndarray, threads: int, repeats: int) -> float:
    """Median GB/s of summing `buf` (as float64) in `threads` equal parts on Python threads."""
    view = buf.view(np.float64)
    parts = np.array_split(view, threads)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))                      # warm: threads started, pages mapped
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            times.append(time.perf_counter() - t0)
    return buf.nbytes / statistics.median(times) / 1e9


def kernel_seconds(x, pool_bufs, n_experts, rows, layout, threads, repeats) -> float:
    """Median seconds of one cpu_expert_rows call on n_experts experts for `rows` rows (each routed to all)."""
    assign = np.tile(np.arange(n_experts, dtype=np.int32), (rows, 1))
    times, start = [], 0
    for i in range(repeats + 2):
        bufs = [pool_bufs[(start + j) % len(pool_bufs)] for j in range(n_experts)]
        start += n_experts
        t0 = time.perf_counter()
        cpu_experts.cpu_expert_rows(x[:rows], bufs, assign, layout, threads=threads)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gil_ms(x, bufs, layout, threads, busy_s: float = 0.004, repeats: int = 15) -> dict[str, float]:
    """ms from the start of a layer's host work to the CPU experts' rows, when the engine thread has `busy_s` of
    Python to do (issuing the GPU half): the kernel on a worker thread started first (it waits for the GIL while the
    engine thread runs Python: the interpreter's switch interval is 5 ms), or on the engine thread after its work
    (what cpu_path does). Also the kernel alone, and the kernel while another Python thread runs Python throughout
    (a server's or the disk reader's threads: the kernel's threads must not need the GIL to start or end)."""
    assign = np.arange(len(bufs), dtype=np.int32)[None]
    call = lambda: cpu_experts.cpu_expert_rows(x[:1], bufs, assign, layout, threads=threads)
    def python_work():
        t = time.perf_counter()
        while time.perf_counter() - t < busy_s:
            sum(range(100))
    out = {"alone": [], "worker_thread": [], "engine_thread": [], "beside_python_thread": []}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    for _ in range(repeats):
        t0 = time.perf_counter(); call(); out["alone"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); f = pool.submit(call); python_work(); f.result()
        out["worker_thread"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); python_work(); call(); out["engine_thread"].append(time.perf_counter() - t0)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(100))
    spinner = threading.Thread(target=spin)
    spinner.start()                     # another Python thread running Python (holding the GIL) throughout
    try:
        for _ in range(repeats):
            t0 = time.perf_counter(); call(); out["beside_python_thread"].append(time.perf_counter() - t0)
    finally:
        stop.set()
        spinner.join()
    pool.shutdown()
    return {k: 1e3 * statistics.median(v) for k, v in out.items()} | {"busy_ms": 1e3 * busy_s}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small buffers, threads 1-2, rows 1-2, 3 repeats")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--fmt", choices=sorted(BLOCKS), default="nvfp4")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8, help="experts per call (V3 top-k: 8)")
    ap.add_argument("--pool", type=int, help="distinct expert buffers cycled through (default 48; quick 12)")
    ap.add_argument("--threads", help="comma-separated thread counts (default 1,2,4,8,16 up to the CPUs)")
    ap.add_argument("--rows", help="comma-separated row counts (default 1,2,4,8)")
    ap.add_argument("--ram-gb", type=float, help="RAM read buffer size (default 4; quick 0.5)")
    ap.add_argument("--repeats", type=int, help="timed calls per configuration (default 10; quick 3)")
    a = ap.parse_args(argv)
    cpus = cpu_experts.default_threads()
    threads = [int(t) for t in a.threads.split(",")] if a.threads else \
        [t for t in ((1, 2) if a.quick else (1, 2, 4, 8, 16)) if t <= cpus]
    rows = [int(r) for r in a.rows.split(",")] if a.rows else ([1, 2] if a.quick else [1, 2, 4, 8])
    pool_n = a.pool or (12 if a.quick else 48)
    ram_gb = a.ram_gb or (0.5 if a.quick else 4.0)
    repeats = a.repeats or (3 if a.quick else 10)

    layout = expert_layout(a.fmt, a.hidden, a.inter)
    per_expert = cpu_experts.expert_bytes(layout)
    t0 = time.perf_counter()
    cpu_experts.warm_up()
    compile_s = time.perf_counter() - t0
    layer = cpu_experts.threading_layer()
    print(f"{platform.processor() or platform.machine()}, {cpus} CPUs; numba kernel ready in {compile_s:.1f} s "
          f"(threading layer {layer}); "
          f"{a.fmt} experts [{a.inter}, {a.hidden}]: {per_expert / 1e6:.2f} MB of codes + scales each, "
          f"{a.experts} per call, pool of {pool_n}", flush=True)

    ram = np.ones(int(ram_gb * 2 ** 30) // 8 * 8, np.uint8)
    ram_gbps = {t: ram_read_gbps(ram, t, max(3, repeats // 2)) for t in threads}
    del ram
    print("RAM read (numpy sum), GB/s: " + ", ".join(f"{t} thr {g:.1f}" for t, g in ram_gbps.items()), flush=True)
    best_ram = max(ram_gbps.values())

    pool_bufs = expert_buffers(layout, a.fmt, pool_n)
    x = np.random.default_rng(1).standard_normal((max(rows), a.hidden)).astype(np.float32)
    results = []
    print(f"\nkernel GB/s of expert bytes (ms per call), {a.experts} experts; last column: rows=1 as % of the best "
          f"RAM read ({best_ram:.1f} GB/s)")
    print("threads " + "".join(f"{'rows=' + str(r):>16}" for r in rows) + "   % RAM")
    for t in threads:
        line = f"{t:>7} "
        for r in rows:
            s = kernel_seconds(x, pool_bufs, a.experts, r, layout, t, repeats)
            gbps = a.experts * per_expert / s / 1e9
            results.append(dict(threads=t, rows=r, ms=s * 1e3, gbps=gbps, frac_ram_same_threads=gbps / ram_gbps[t],
                                frac_ram_best=gbps / best_ram))
            line += f"{gbps:>8.2f} ({s * 1e3:5.1f})"
        line += f"   {100 * results[-len(rows)]['gbps'] / best_ram:5.1f}%"
        print(line, flush=True)

    tiny = expert_layout(a.fmt, 256, 128)
    tiny_buf = expert_buffers(tiny, a.fmt, 1)
    overhead_us = {}
    for t in threads:
        xs = np.zeros((1, 256), np.float32)
        overhead_us[t] = 1e6 * kernel_seconds(xs, tiny_buf, 1, 1, tiny, t, max(20, repeats))
    print("\nfixed cost of a call (1 tiny expert, 1 row), us: " +
          ", ".join(f"{t} thr {u:.0f}" for t, u in overhead_us.items()))

    g = gil_ms(x, pool_bufs[:a.experts], layout, threads[-1])
    print(f"\n{a.experts} experts, 1 row, {threads[-1]} threads, beside {g['busy_ms']:.0f} ms of engine-thread Python: "
          f"kernel alone {g['alone']:.1f} ms; work + kernel on a worker thread {g['worker_thread']:.1f} ms, "
          f"on the engine thread after its work {g['engine_thread']:.1f} ms; kernel beside a Python thread running "
          f"Python {g['beside_python_thread']:.1f} ms")

    report = dict(gil_ms=g, 
        machine=dict(processor=platform.processor(), machine=platform.machine(), cpus=cpus,
                     numba=__import__("numba").__version__, numpy=np.__version__,
                     threading_layer=layer),
        config=dict(fmt=a.fmt, hidden=a.hidden, inter=a.inter, experts=a.experts, pool=pool_n, ram_gb=ram_gb,
                    repeats=repeats, expert_bytes=per_expert, quick=a.quick),
        compile_seconds=compile_s, ram_read_gbps={str(t): g for t, g in ram_gbps.items()},
        kernel=results, call_overhead_us={str(t): u for t, u in overhead_us.items()})
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()

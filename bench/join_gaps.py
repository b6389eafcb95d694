"""How long a running stream stops when another request joins it, with compile ahead on and off.

A stream A decodes; after it has produced --after tokens, request B joins with a longer max_new_tokens, so the batch
meets a new decode shape (2 rows, a wider page table) once B has prefilled. Each setting runs in a fresh process with
the persistent compilation cache off (every compile is real), after a warm-up that compiles A's own shapes. Prints
A's largest inter-token gap after B joined, A's median gap, and what the compile thread did. compile ahead is
forced on and off here (compute_config.compile_ahead's auto turns it off on hosts of fewer than 4 CPUs).

    python bench/join_gaps.py [STORE] [--gpu-memory 16GB --host-memory 96GB] [--out gaps.json]

STORE defaults to the embedded model's store (built as `dsjax demo` builds it), tiered under its demo budgets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def child(store: str, on: bool, gpu: str | None, host: str | None, after: int, a_tokens: int,
          b_tokens: int) -> dict:
    import numpy as np

    import dsjax
    if gpu is None:
        from dsjax.demo import demo_budgets
        b = demo_budgets(store)
        gpu, host = int(b["gpu_memory"] * 1.5), "2GB"
    e = dsjax.load(store, gpu_memory=gpu, host_memory=host, compile_ahead="on" if on else "off", cpu_experts="off")
    pa, pb = [5, 17, 33, 2, 9], [7, 7, 100, 4]
    e.generate([pa], max_new_tokens=a_tokens)        # A's shapes, compiled
    times: list[float] = []
    started = threading.Event()

    def run_a():
        for _ in e.stream([pa], max_new_tokens=a_tokens):
            times.append(time.perf_counter())
            if len(times) == after:
                started.set()
    t = threading.Thread(target=run_a)
    t.start()
    started.wait()
    joined = time.perf_counter()
    e.generate([pb], max_new_tokens=b_tokens)
    t.join()
    gaps = np.diff(times)
    after_join = gaps[np.asarray(times[1:]) > joined]
    stats = e.stats()["steps"].get("compile_ahead")
    e.close()
    return {"compile_ahead": on, "a_tokens": len(times), "median_gap_ms": float(np.median(gaps) * 1e3),
            "max_gap_after_join_ms": float(after_join.max() * 1e3) if len(after_join) else None,
            "compile_thread": stats, "gaps_after_join_ms": [round(float(g) * 1e3) for g in after_join[:12]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?")
    ap.add_argument("--gpu-memory")
    ap.add_argument("--host-memory")
    ap.add_argument("--after", type=int, default=8, help="A's tokens before B joins")
    ap.add_argument("--a-tokens", type=int, default=40)
    ap.add_argument("--b-tokens", type=int, default=300)
    ap.add_argument("--out")
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        r = child(args.store, args.child == "on", args.gpu_memory, args.host_memory, args.after, args.a_tokens,
                  args.b_tokens)
        print("RESULT " + json.dumps(r))
        return
    store = args.store
    if store is None:
        from dsjax.demo import ensure_demo_store
        store = ensure_demo_store()
    rows = []
    for flag in ("off", "on"):
        cmd = [sys.executable, os.path.abspath(__file__), store, "--child", flag, "--after", str(args.after), "--a-tokens",
               str(args.a_tokens), "--b-tokens", str(args.b_tokens)]
        if args.gpu_memory:
            cmd += ["--gpu-memory", args.gpu_memory, "--host-memory", args.host_memory]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DSJAX_COMPILE_CACHE": "off"})
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"child {flag} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
    print("| compile ahead | A's median gap ms | A's largest gap after B joined ms | compile thread |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['compile_ahead'] else 'off'} | {r['median_gap_ms']:.1f} | "
              f"{r['max_gap_after_join_ms']:.1f} | {r['compile_thread']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

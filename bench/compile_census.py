"""Compile census: which jitted functions compile, how many times and for how long, while a tiered engine loads and
runs its first generation at batch 1, then at batch 8 (what every new process pays when the persistent compilation
cache does not have the executables), then three checks: batch 1 with a longer prompt, batch 8 again, and batch 1
generating 64 more tokens (a longer KV cache).

Per phase and function: compiles, distinct argument signatures, and seconds spent tracing, lowering to MLIR and in
the XLA backend (JAX's monitoring events; the backend time includes a persistent-cache lookup, so run it with the
cache off, the default here). On a CPU the FP4 matmuls trace their jnp references, not the Pallas kernels: the
functions and their argument shapes are the GPU's, the seconds are not.

    python bench/compile_census.py --demo                                   # embedded demo store, tests' tight budget
    python bench/compile_census.py /tmp/v3s1 --gpu-memory 5GB --host-memory 4.5GB --dtype bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import logging
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("DSJAX_COMPILE_CACHE", "off")        # measure compiles, not cache reads
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.monitoring  # noqa: E402

import dsjax  # noqa: E402

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "backend_s"}


class Census:
    """Accumulates compile events per (phase, function) while `phase` names what runs."""

    def __init__(self):
        self.phase = "import"
        self.rows: dict = collections.defaultdict(lambda: {"compiles": 0, "signatures": set(), "trace_s": 0.0,
                                                            "lower_s": 0.0, "backend_s": 0.0})
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        handler = logging.Handler()
        handler.emit = self._log
        logger = logging.getLogger("jax._src.interpreters.pxla")
        logger.addHandler(handler)
        logger.propagate = False                # the lines are counted here, not printed
        quiet = logging.getLogger("jax._src.dispatch")   # its timing lines repeat the monitoring events
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        jax.config.update("jax_log_compiles", True)

    @staticmethod
    def _name(fun_name: str) -> str:
        """'jit(_attn)' (lowering, backend) and '_attn' (tracing) are one function."""
        return fun_name[4:-1] if fun_name.startswith("jit(") and fun_name.endswith(")") else fun_name

    def _duration(self, event: str, seconds: float, **kw) -> None:
        if event in EVENTS and "fun_name" in kw:
            self.rows[(self.phase, self._name(str(kw["fun_name"])))][EVENTS[event]] += seconds

    def _log(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("Compiling %s with global shapes"):
            row = self.rows[(self.phase, self._name(str(record.args[0])))]
            row["compiles"] += 1
            row["signatures"].add(str(record.args[1:3]))      # argument shapes, dtypes and shardings

    def table(self) -> list[dict]:
        return [{"phase": p, "function": f, **{k: (len(v) if k == "signatures" else v) for k, v in r.items()}}
                for (p, f), r in self.rows.items()]


def demo_store(root: str) -> tuple[str, dict]:
    """The tests' store (embedded demo checkpoint, NVFP4, policy mlp) and their 'tight' budget."""
    from dsjax.demo import write_demo_checkpoint
    from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    from dsjax.store.writer import convert
    dst = os.path.join(root, "store")
    convert(write_demo_checkpoint(os.path.join(root, "ckpt")), dst, fmt="nvfp4", policy="mlp", progress=False)
    mb = model_bytes_from_store(Store(dst))
    tight = dict(max_gpu_layers=1, prefetch_layers=1)
    return dst, dict(gpu_memory=minimum_gpu_memory(mb, context_tokens=512, **tight),
                     host_memory=2 * minimum_host_memory(mb), **tight)


def report(census: Census, phase: str, wall: float) -> None:
    rows = sorted((r for r in census.table() if r["phase"] == phase and r["compiles"]),
                  key=lambda r: -(r["trace_s"] + r["lower_s"] + r["backend_s"]))
    print(f"\n{phase}: wall {wall:.1f} s, {sum(r['compiles'] for r in rows)} compiles, "
          f"{sum(r['trace_s'] + r['lower_s'] + r['backend_s'] for r in rows):.1f} s tracing+lowering+compiling")
    print(f"  {'function':<24} {'compiles':>8} {'sigs':>5} {'trace s':>8} {'lower s':>8} {'backend s':>9}")
    for r in rows:
        print(f"  {r['function']:<24} {r['compiles']:>8} {r['signatures']:>5} {r['trace_s']:>8.2f} "
              f"{r['lower_s']:>8.2f} {r['backend_s']:>9.2f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?")
    ap.add_argument("--demo", action="store_true", help="build the demo store in a temp dir (the tests' budget)")
    ap.add_argument("--gpu-memory")
    ap.add_argument("--host-memory")
    ap.add_argument("--max-gpu-layers", type=int, default=1)
    ap.add_argument("--prefetch-layers", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--phases", default="b1,b8,b1-long,b8-again,b1-S128",
                    help="generations after the load, in order (default: all five)")
    ap.add_argument("--json", help="write the table and every signature here")
    args = ap.parse_args(argv)
    if args.demo:
        root = tempfile.mkdtemp(prefix="census-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        store, budget = demo_store(root)
    else:
        store = args.store
        budget = dict(gpu_memory=args.gpu_memory, host_memory=args.host_memory, max_gpu_layers=args.max_gpu_layers,
                      prefetch_layers=args.prefetch_layers)
    census = Census()
    walls: dict[str, float] = {}
    census.phase = "load"
    t0 = time.perf_counter()
    engine = dsjax.load(store, dtype=args.dtype, **budget)
    walls["load"] = time.perf_counter() - t0
    p = engine.placement
    head = (f"store {store}; budget {budget}; dtype {args.dtype}; backend {jax.default_backend()}; "
            f"GPU expert slots {engine.experts.slots.capacity if engine.experts else 'all'}, "
            f"host experts {p.host_experts}, ring {p.ring_slots}, resident layers {list(p.resident_layers)}")
    print(head, flush=True)
    report(census, "load", walls["load"])
    V, n = engine.config.vocab_size, args.new_tokens
    prompt = lambda length, seed: [(seed * 7919 + 31 * i + 1) % V for i in range(length)]   # noqa: E731
    phases = {"b1": [prompt(12, 0)],                                       # prefill bucket T=16
              "b8": [prompt(5 + s, s) for s in range(8)],                  # the same prefill bucket
              "b1-long": [prompt(40, 9)],                                  # a 40-token prompt: prefill bucket T=48
              "b8-again": [prompt(5 + s, s + 1) for s in range(8)],        # nothing new: expect no compiles
              "b1-S128": [prompt(12, 3)]}                                  # b1 with 64 more new tokens: KV length 128
    for name in args.phases.split(","):
        census.phase = name
        t0 = time.perf_counter()
        engine.generate(phases[name], max_new_tokens=n + 64 if name == "b1-S128" else n, stop_token_ids=())
        walls[name] = time.perf_counter() - t0
        report(census, name, walls[name])
        if args.json:          # after every phase, so a run stopped early keeps what it measured
            sigs = {f"{ph} / {f}": sorted(r["signatures"]) for (ph, f), r in census.rows.items()}
            with open(args.json, "w") as f:
                json.dump({"setup": head, "walls_s": walls, "rows": census.table(), "signatures": sigs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tiered runtime on the machine at hand (meant for the GPU machine): the same tokens under every budget, the
runtime's own figures per budget, the kernel path against the references, and a jax.profiler trace of a
streamed decode (transfers and compute side by side, for Perfetto / XProf).

    python bench/runtime_gpu.py --out OUT_DIR

Uses the embedded demo model (tiny DeepSeek-V3 architecture), converted to an NVFP4 store; absolute speeds of a
model this small measure dispatch overhead, not links: it is a correctness and evidence run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time

import jax
import numpy as np

import dsjax
from dsjax.demo import write_demo_checkpoint
from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
from dsjax.runtime.tiered import model_bytes_from_store
from dsjax.store.reader import Store
from dsjax.store.writer import convert

PROMPTS = [[0, 17, 42, 99, 7, 3, 250, 11, 80, 5, 6, 120], [0, 5, 6]]


def oracle_check() -> list[str]:
    """float32 logits against the transformers oracle on this backend (TF32 would show here)."""
    rows = []
    root = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "oracle")
    for name in sorted(os.listdir(root)):
        ref = np.load(os.path.join(root, name, "reference.npz"))
        got = dsjax.load(os.path.join(root, name), dtype="float32").logits(ref["input_ids"])
        err = np.linalg.norm(got - ref["logits"]) / np.linalg.norm(ref["logits"])
        rows.append(f"oracle {name:10s} float32 logits rel L2 vs transformers: {err:.2e}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=".", help="directory for the trace archive")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--fusion", default="both", choices=["both", "on", "off"], help="kernel paths to run")
    ap.add_argument("--no-trace", action="store_true", help="skip the profiler trace of the tight budget")
    ap.add_argument("--budgets", default="", help="comma-separated subset of the budgets (default: all)")
    args = ap.parse_args()
    lines = [f"backend {jax.default_backend()}, device {jax.devices()[0].device_kind}"]
    lines += oracle_check()

    work = tempfile.mkdtemp(prefix="dsjax-gpu-")
    ckpt, store = os.path.join(work, "ckpt"), os.path.join(work, "store")
    write_demo_checkpoint(ckpt)
    convert(ckpt, store, fmt="nvfp4", policy="mlp", progress=False)
    mb = model_bytes_from_store(Store(store))
    tight = dict(max_gpu_layers=1, prefetch_layers=1)
    g, h = minimum_gpu_memory(mb, context_tokens=512, **tight), minimum_host_memory(mb)
    budgets = {"unlimited": {}, "roomy": dict(gpu_memory=4 * g, host_memory=100 * h),
               "roomy-no-overlap": dict(gpu_memory=4 * g, host_memory=100 * h, overlap_io=False),
               "tight": dict(gpu_memory=g, host_memory=2 * h, **tight),
               "tight-no-overlap": dict(gpu_memory=g, host_memory=2 * h, overlap_io=False, **tight),
               "minimal": dict(gpu_memory=g, host_memory=h, **tight)}
    if args.budgets:
        budgets = {n: budgets[n] for n in args.budgets.split(",")}
    tokens = {}
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.fusion]
    for fusion in modes:
        for name, kw in budgets.items():
            print(f"[runtime_gpu] fusion={fusion} {name}", file=sys.stderr, flush=True)   # where a crash happened
            e = dsjax.load(store, dtype="bfloat16", enable_fusion=fusion, **kw)
            e.generate(PROMPTS, max_new_tokens=4, stop_token_ids=())            # compile + warm the caches
            t0 = time.perf_counter()
            out = e.generate(PROMPTS, max_new_tokens=args.tokens, stop_token_ids=())
            dt = time.perf_counter() - t0
            tokens[(fusion, name)] = [o.token_ids for o in out]
            s = e.stats()
            links = ", ".join(f"{k} {v['bytes'] / 1e6:.1f} MB" + (f" @ {v['GB_per_s']:.2f} GB/s" if v["GB_per_s"]
                                                                    else "") for k, v in s["links"].items())
            hit = ", ".join(f"{k} {v:.2f}" for k, v in s["hit_rates"].items()) or "all experts on GPU"
            pr = s["prediction"]
            lines.append(
                f"fusion={fusion!s:5} {name:16s} {2 * args.tokens / dt:7.1f} tok/s (batch 2) | stall "
                f"{s['stall_seconds'] * 1e3:.1f} ms | hit {hit} | prediction p={pr['precision']} r={pr['recall']} | "
                f"{links}")
            print(lines[-1], file=sys.stderr, flush=True)
            if fusion and name == "tight" and not args.no_trace:
                trace = os.path.join(work, "trace")
                opts = jax.profiler.ProfileOptions()
                opts.python_tracer_level = 0                 # device streams and copies, not every Python call
                with jax.profiler.trace(trace, profiler_options=opts):
                    e.generate(PROMPTS[:1], max_new_tokens=3, stop_token_ids=())
                os.makedirs(args.out, exist_ok=True)
                with tarfile.open(os.path.join(args.out, "trace_tight_decode.tar.gz"), "w:gz") as tf:
                    tf.add(trace, arcname="trace")
            e.close()
    for fusion in modes:
        if "unlimited" not in budgets:
            continue
        ref = tokens[(fusion, "unlimited")]
        same = all(tokens[(fusion, n)] == ref for n in budgets)
        lines.append(f"fusion={fusion}: same tokens under every budget: {same}")
    if len(modes) == 2 and "unlimited" in budgets:
        agree = np.mean([a == b for x, y in zip(tokens[(False, "unlimited")], tokens[(True, "unlimited")])
                         for a, b in zip(x, y)])
        lines.append(f"kernels vs references (bf16): {agree:.2%} of greedy tokens agree")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

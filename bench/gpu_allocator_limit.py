"""How much of the GPU a JAX process can allocate, under JAX's allocator settings (the GPU machine only).

dsjax's gpu_memory budget assumes the process may allocate that many bytes. JAX's GPU client starts a BFC pool at a
fraction of the card (75% unless XLA_CLIENT_MEM_FRACTION / XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise); whether
that pool grows past its start decides whether `--gpu-memory 16GB` on a 16 GB card can work at all. For each setting,
in a fresh process: the allocator's reported limit and in-use bytes before anything is allocated, then 1 GiB arrays
allocated until one fails (each filled, so it is real), the bytes reached and the error's first line.

    python bench/gpu_allocator_limit.py [--out allocator.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, jax, jax.numpy as jnp
d = jax.devices()[0]
if d.platform != "gpu":              # on a CPU backend the loop would take the host's RAM
    raise SystemExit(f"needs a GPU, jax.devices()[0] is {d.platform}")
s0 = d.memory_stats() or {}
held, err = [], None
try:
    for _ in range(512):
        a = jnp.ones((1 << 28,), jnp.float32, device=d)            # 1 GiB each
        a.block_until_ready()                                       # a failed allocation raises here
        held.append(a)
except Exception as e:           # XlaRuntimeError: RESOURCE_EXHAUSTED
    err = str(e).strip().splitlines()[0][:200]
s1 = d.memory_stats() or {}
print(json.dumps({"device": d.device_kind, "limit_before": s0.get("bytes_limit"),
                  "in_use_before": s0.get("bytes_in_use"), "allocated_GiB": len(held),
                  "limit_after": s1.get("bytes_limit"), "peak": s1.get("peak_bytes_in_use"), "error": err}))
"""

SETTINGS = {
    "default": {},
    "PREALLOCATE=false": {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
    "MEM_FRACTION=.95": {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".95"},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = {}
    for name, env in SETTINGS.items():
        ours = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")
        base = {k: v for k, v in os.environ.items() if k not in ours}
        r = subprocess.run([sys.executable, "-c", CHILD], env=base | env, capture_output=True, text=True, timeout=600)
        rows[name] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"stderr": r.stderr[-500:]}
        print(name, rows[name], flush=True)
    gib = 1 << 30
    print("\n| setting | limit before (GiB) | in use before | allocated before failing (GiB) | limit after | error |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        f = lambda v: f"{v / gib:.1f}" if isinstance(v, int) else "-"     # noqa: E731
        print(f"| {name} | {f(r.get('limit_before'))} | {f(r.get('in_use_before'))} | {r.get('allocated_GiB', '-')} | "
              f"{f(r.get('limit_after'))} | {r.get('error') or '-'} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

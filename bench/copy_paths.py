"""Where the engine thread's time goes when experts cross host->GPU (issue 20, item 1): n V3-sized NVFP4 experts
(one flat pinned buffer each, dsjax's ExpertLayout) copied into a GPU slot pool, by several paths, timed per call:
the calling thread's wall and CPU time to issue the call (time.thread_time) and the wall time until the pool is ready.

  A  today's path: jax.device_put(list of n pinned buffers) then one jitted slot write (ExpertCache.load + flush)
  B  the copy inside the slot write: one jit whose inputs are the pinned buffers (XLA issues the copies)
  C  jax.device_put of the list alone              D  jax.device_put of one pinned buffer holding all n
  E  the slot write alone (rows already on the GPU)  F  a trivial jitted call (dispatch floor)
  G  one jax.device_put per expert, issued from --threads worker threads at once, then the slot write (does issuing
     the copies in parallel cut the calling thread's wait? the issue CPU column here is the caller's, not the workers')

    python bench/copy_paths.py [--experts 1,8,16] [--reps 20] [--out copy_paths.json]

On the CPU backend the figures are only a smoke test (no link); run it on the GPU machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsjax.runtime.expert_layout import ALIGN, ExpertLayout, Part, unflatten  # noqa: E402
from dsjax.runtime.tiers import _write_slots, shardings  # noqa: E402


def v3_layout(hidden: int = 7168, inter: int = 2048) -> ExpertLayout:
    """A DeepSeek-V3 routed expert in NVFP4 (two values per byte, one fp8 scale per 16, one float32 global scale)."""
    parts, off = [], 0
    for proj, (rows, cols) in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
        for field, shape, dtype in (("packed", (rows, cols // 2), "uint8"), ("scales", (rows, cols // 16), "uint8"),
                                    ("global_scale", (), "float32")):
            parts.append(Part(proj, field, off, shape, dtype))
            off += -(-parts[-1].nbytes // ALIGN) * ALIGN
    return ExpertLayout(tuple(parts), tuple((p, "nvfp4") for p in ("gate", "up", "down")), off)


def timed(fn, reps: int) -> dict[str, float]:
    fn()                                       # compile / warm
    jax.block_until_ready(fn())
    walls, cpus, totals = [], [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        t1, c1 = time.perf_counter(), time.thread_time()
        jax.block_until_ready(out)
        totals.append(time.perf_counter() - t0)
        walls.append(t1 - t0)
        cpus.append(c1 - c0)
    med = statistics.median
    return {"issue_wall_ms": med(walls) * 1e3, "issue_cpu_ms": med(cpus) * 1e3, "total_ms": med(totals) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", default="1,8,16", help="experts per call (comma list)")
    ap.add_argument("--slots", type=int, default=64, help="GPU slots in the pool")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=4, help="worker threads of path G")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = jax.devices()[0]
    s_dev, s_host = shardings(dev)
    layout = v3_layout(a.hidden, a.inter)
    B = layout.nbytes
    ns = [int(n) for n in a.experts.split(",")]
    rng = np.random.default_rng(0)
    host = [jax.device_put(rng.integers(0, 255, B, dtype=np.uint8), s_host) for _ in range(max(ns))]
    template = jax.eval_shape(lambda r: unflatten(r, layout), jax.ShapeDtypeStruct((B,), jnp.uint8))
    pool = [jax.tree.map(lambda t: jax.device_put(jnp.zeros((a.slots,) + t.shape, t.dtype), s_dev), template)]
    write = jax.jit(_write_slots, static_argnums=3, donate_argnums=0)

    def fused(pool, idx, rows):
        return _write_slots(pool, idx, tuple(jax.device_put(r, s_dev) for r in rows), layout)
    fused_j = jax.jit(fused, donate_argnums=0)
    trivial = jax.jit(lambda x: x + 1)
    one = jnp.zeros((8,), jnp.float32)
    workers = concurrent.futures.ThreadPoolExecutor(a.threads, thread_name_prefix="copy")
    rows = []
    for n in ns:
        idx = jax.device_put(np.arange(n, dtype=np.int32), s_dev)
        bufs = host[:n]
        dev_rows = tuple(jax.device_put(bufs, s_dev))
        big = jax.device_put(np.concatenate([np.asarray(b) for b in bufs]), s_host)

        def path_a():
            devs = jax.device_put(bufs, s_dev)
            pool[0] = write(pool[0], idx, tuple(devs), layout)
            return pool[0]

        def path_b():
            pool[0] = fused_j(pool[0], idx, tuple(bufs))
            return pool[0]

        def path_g():
            devs = list(workers.map(lambda b: jax.device_put(b, s_dev), bufs))
            pool[0] = write(pool[0], idx, tuple(devs), layout)
            return pool[0]

        def path_e():
            pool[0] = write(pool[0], idx, dev_rows, layout)
            return pool[0]
        paths = {"A list put + slot write": path_a, "B copy inside the slot write": path_b,
                 f"G {a.threads} threads put + slot write": path_g,
                 "C list put alone": lambda: jax.device_put(bufs, s_dev),
                 "D one put of n experts": lambda: jax.device_put(big, s_dev),
                 "E slot write alone": path_e, "F trivial jit": lambda: trivial(one)}
        # the copy inside the slot write must write what today's path writes (every part, bit for bit)
        got = {}
        for key, fn in (("A", path_a), ("B", path_b), ("G", path_g)):
            pool[0] = jax.tree.map(jnp.zeros_like, pool[0])
            got[key] = [np.asarray(x) for x in jax.tree.leaves(fn())]
        want = [np.asarray(x) for x in jax.tree.leaves(unflatten(jnp.stack([jnp.asarray(np.asarray(b)) for b in bufs]),
                                                               layout))]
        for a_, b_, g_, w in zip(got["A"], got["B"], got["G"], want):
            u8 = lambda x: np.ascontiguousarray(x).view(np.uint8)      # random bytes: NaNs among the floats
            if not (np.array_equal(u8(a_), u8(b_)) and np.array_equal(u8(a_), u8(g_))
                    and np.array_equal(u8(a_[:n]), u8(w))):
                raise SystemExit(f"paths B or G wrote other bytes than path A at {n} experts")
        for name, fn in paths.items():
            r = timed(fn, a.reps)
            moved = 0 if name[0] in "EF" else n * B
            r.update(path=name, experts=n, bytes=moved,
                     GB_s=moved / (r["total_ms"] * 1e-3) / 1e9 if moved else None)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{dev.device_kind}, expert {B / 1e6:.2f} MB, jax {jax.__version__}; medians of {a.reps}\n")
    print("| path | experts | issue wall ms | issue CPU ms | total ms | GB/s |\n|---|---|---|---|---|---|")
    for r in rows:
        gb = f"{r['GB_s']:.1f}" if r["GB_s"] else "-"
        print(f"| {r['path']} | {r['experts']} | {r['issue_wall_ms']:.3f} | {r['issue_cpu_ms']:.3f} | "
              f"{r['total_ms']:.3f} | {gb} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": dev.device_kind, "expert_bytes": B, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

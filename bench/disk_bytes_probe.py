"""Disk and host->GPU bytes per decode step of the budget config against load-on-demand, on DeepSeek-V3's routing
topology (256 routed experts, top-8, 8 groups, 6 MoE layers) at toy widths, on the CPU. Bytes moved per step depend
on the placement, the routing and the prefetch policy, not on the hardware, so a policy change can be judged here
before a GPU run times it. Tiers sized like the V3 slice's cold run (bench/RESULTS.md, run 6: per MoE layer ~100 of
256 experts in GPU slots and ~66 in the pinned host cache with the default budgets). The measuring is `dsjax
bench`'s (budget and on_demand rows, untraced); `--set` options reach both configs (on-demand prefetches nothing, so
prefetch options change only the budget row).

    python bench/disk_bytes_probe.py [--batch 1] [--gpu-memory 50MB] [--host-memory 30MB] [--set KEY=VALUE ...]

Prints experts per decode step per link (budget, on-demand) and the ratio of their disk bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dsjax.cli import parse_overrides  # noqa: E402
from dsjax.runtime.bench import bench  # noqa: E402
from dsjax.runtime.tiered import model_bytes_from_store  # noqa: E402
from dsjax.store.reader import Store  # noqa: E402
from host_overhead import toy_store  # noqa: E402  (bench/: V3's topology at toy widths, the same store)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "dsjax-v3-toy"),
                    help="written on first use (bench/host_overhead.py's store)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16, help="decode steps measured")
    ap.add_argument("--gpu-memory", default="50MB")
    ap.add_argument("--host-memory", default="30MB")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="runtime option (repeatable)")
    args = ap.parse_args(argv)
    store = toy_store(args.store)
    expert = model_bytes_from_store(Store(store)).expert
    result = bench(store, gpu_memory=args.gpu_memory, host_memory=args.host_memory, batches=(args.batch,),
                   configs=("budget", "on_demand"), prompt_len=32, tokens=args.tokens + 1, dtype="float32",
                   trace=False, **parse_overrides(args.set))
    per = {}
    for r in result["rows"]:
        per[r["config"]] = {k: r["bytes_per_step"].get(k, 0) / expert for k in ("disk->host", "host->GPU")}
        print(f"{r['config']}: experts per decode step {({k: round(v, 1) for k, v in per[r['config']].items()})}, "
              f"hit rates {({k: round(v, 2) for k, v in r['hit_rates'].items()})}, prediction precision "
              f"{r['prediction'].get('precision')}")
    ratio = per["budget"]["disk->host"] / max(per["on_demand"]["disk->host"], 1e-9)
    print(f"disk bytes, budget / on-demand: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

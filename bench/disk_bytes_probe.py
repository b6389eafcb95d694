"""Disk and host->GPU bytes per decode step of the budget config against load-on-demand, on DeepSeek-V3's routing
topology (256 routed experts, top-8, 8 groups, 6 MoE layers) at toy widths, on the CPU. Bytes moved per step depend
on the placement, the routing and the prefetch policy, not on the hardware, so a policy change can be judged here
before a GPU run times it. Tiers sized like the V3 slice's cold run (bench/RESULTS.md, run 6: per MoE layer ~100 of
256 experts in GPU slots and ~66 in the pinned host cache with the default budgets).

    python bench/disk_bytes_probe.py [--batch 1] [--gpu-memory 100MB] [--host-memory 60MB] [--set KEY=VALUE ...]

Prints experts per decode step per link (budget, on-demand) and the ratio of their disk bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import dsjax  # noqa: E402
from dsjax.cli import _overrides  # noqa: E402
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
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="runtime option of the budget config (repeatable)")
    args = ap.parse_args(argv)
    store = toy_store(args.store)
    expert = model_bytes_from_store(Store(store)).expert
    vocab = Store(store).config.vocab_size
    per = {}
    for name, kw in (("budget", _overrides(args.set)), ("on_demand", {"overlap_io": False})):
        e = dsjax.load(store, dtype="float32", gpu_memory=args.gpu_memory, host_memory=args.host_memory, **kw)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(2, vocab, 32).tolist() for _ in range(args.batch)]
        if name == "budget":
            print(e.placement.report(e.model_bytes, e.links).splitlines()[4])
        e.generate(prompts, max_new_tokens=2, stop_token_ids=())                  # compile, warm the caches
        b0 = e.stats().get("phase_bytes", {}).get("decode", {})
        e.generate(prompts, max_new_tokens=args.tokens + 1, stop_token_ids=())
        s = e.stats()
        b1 = s.get("phase_bytes", {}).get("decode", {})
        per[name] = {k: (b1.get(k, 0) - b0.get(k, 0)) / args.tokens / expert for k in ("disk->host", "host->GPU")}
        print(f"{name}: experts per decode step {({k: round(v, 1) for k, v in per[name].items()})}, hit rates "
              f"{({k: round(v, 2) for k, v in s['hit_rates'].items()})}, prediction precision "
              f"{s['prediction'].get('precision')}")
        e.close()
    ratio = per["budget"]["disk->host"] / max(per["on_demand"]["disk->host"], 1e-9)
    print(f"disk bytes, budget / on-demand: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

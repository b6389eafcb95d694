"""Write a real-width DeepSeek-V3 slice straight into the dsjax store format (issue 5's benchmark model).

Hidden 7168, MLA dims, vocab 129280, 256 routed + 1 shared experts of width 2048 in NVFP4 (generated, not
quantized), one dense layer then N MoE layers: every layer has V3's true size, so per-layer figures extrapolate to
61 layers on paper. Deterministic per seed (the bytes do not depend on --workers); resumable like any conversion
(re-run the same command).

    python bench/make_v3_slice.py /nvme/v3-slice --moe-layers 6 [--workers 16]     # ~44 GB
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dsjax.runtime.planner import ModelBytes, fmt_bytes  # noqa: E402
from dsjax.config import ModelConfig  # noqa: E402
from dsjax.store.synthetic import SyntheticSource, v3_slice_config  # noqa: E402
from dsjax.store.writer import convert, default_workers  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst", help="store directory to write (resumes an unfinished one)")
    ap.add_argument("--moe-layers", type=int, default=6, help="MoE layers after the dense one (default 6: ~44 GB)")
    ap.add_argument("--experts", type=int, default=256, help="routed experts per layer (default 256, as V3)")
    ap.add_argument("--policy", default="mlp", choices=["experts", "mlp", "all", "all+lm_head"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help=f"threads generating and writing (default {default_workers()}: cores, at most 16)")
    args = ap.parse_args(argv)
    over = {} if args.experts == 256 else {"n_routed_experts": args.experts}
    if args.experts < 16 or args.experts % 8:         # V3's 8 groups need >= 2 experts each
        over.update(n_group=1, topk_group=1, num_experts_per_tok=min(8, args.experts))
    config = v3_slice_config(args.moe_layers, **over)
    mb = ModelBytes.from_config(ModelConfig.from_dict(config), "nvfp4", args.policy)
    print(f"V3 slice: 1 dense + {args.moe_layers} MoE layers x {args.experts} experts, {fmt_bytes(mb.total)} "
          f"(one expert {fmt_bytes(mb.expert)}, one MoE layer's experts {fmt_bytes(mb.expert * args.experts)})")
    src = SyntheticSource(config, args.dst.rstrip("/") + "-src", policy=args.policy, seed=args.seed,
                          workers=args.workers)
    complete = os.path.exists(os.path.join(args.dst, "manifest.json"))
    t0 = time.perf_counter()
    convert(src, args.dst, fmt="nvfp4", policy=args.policy, progress=True, workers=args.workers)
    dt = time.perf_counter() - t0
    if complete:
        print(f"already complete, nothing written: {args.dst}")
    else:
        print(f"written in {dt:.0f} s ({mb.total / 1e6 / dt:.0f} MB/s, {args.workers} workers): {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

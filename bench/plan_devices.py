"""Predicted decode speed of DeepSeek-V3 (NVFP4, policy mlp) on 1/2/4/8 GPUs of one host (issue 22), from
dsjax.runtime.plan_devices: no GPU needed, nothing measured. Prints the markdown of bench/RESULTS.md's section
"Several GPUs: predicted (issue 22)".

    python bench/plan_devices.py [--h2d-gbps 50 --disk-gbps 12 --hbm-gbps 3000]
"""

from __future__ import annotations

import argparse

from dsjax.config import ModelConfig
from dsjax.runtime.plan_devices import ALLREDUCE_S, table, v3_model_bytes
from dsjax.runtime.planner import GB, Links, ModelBytes
from dsjax.store.synthetic import v3_slice_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--h2d-gbps", type=float, default=50.0, help="pinned host->GPU GB/s of each GPU's own link")
    ap.add_argument("--disk-gbps", type=float, default=12.0, help="NVMe GB/s, shared by every GPU")
    ap.add_argument("--hbm-gbps", type=float, default=3000.0, help="GPU memory GB/s")
    ap.add_argument("--attended", type=int, default=1024, help="cached tokens a decode row attends to at B > 1")
    args = ap.parse_args()
    links = Links(h2d=args.h2d_gbps * GB, disk=args.disk_gbps * GB, hbm=args.hbm_gbps * GB)
    v3 = v3_model_bytes()
    rows = ([(n, "16GB", "96GB", "replicated") for n in (1, 2, 4, 8)]
            + [(n, "16GB", "96GB", "first") for n in (2, 4, 8)]
            + [(n, "16GB", "96GB", "sharded") for n in (2, 4, 8)]
            + [(n, "80GB", "96GB", "replicated") for n in (1, 2, 4, 8)])
    print(f"DeepSeek-V3, NVFP4, policy mlp: {v3.total / 1e9:.1f} GB (routed experts "
          f"{v3.expert * v3.n_experts * len(v3.moe_layers) / 1e9:.1f} GB). Links: {args.h2d_gbps:g} GB/s host->GPU per "
          f"GPU, {args.disk_gbps:g} GB/s disk shared, {args.hbm_gbps:g} GB/s HBM; all-reduce "
          f"{ALLREDUCE_S * 1e6:.0f} us per MoE layer; attended tokens at B > 1: {args.attended}.\n")
    print(table(rows, v3, links, batches=(1, 8, 32), attended_tokens=args.attended))
    sl = ModelBytes.from_config(ModelConfig.from_dict(v3_slice_config(6)), "nvfp4", "mlp")
    print(f"\nThe V3 slice of issue 5 (1 dense + 6 MoE layers at V3 width, {sl.total / 1e9:.1f} GB), the issue's "
          "2-GPU measurement:\n")
    print(table([(1, "16GB", "96GB", "replicated"), (2, "16GB", "96GB", "replicated"), (2, "16GB", "96GB", "first"),
                 (2, "16GB", "96GB", "sharded"), (1, "80GB", "96GB", "replicated"), (2, "80GB", "96GB", "replicated")],
                sl, links, batches=(1, 8, 32), attended_tokens=args.attended))


if __name__ == "__main__":
    main()

"""Plots of a `dsjax bench` result: per configuration and batch, host->GPU GB/s and GPU busy fraction over the
profiled decode (from the trace each row keeps), against the host->GPU ceiling measured in the same run.

    python bench/plot_bench.py RESULT.json OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(result: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    c = result["ceilings"]
    paths = []
    rows = [r for r in result["rows"] if r.get("trace") and r["trace"].get("kernel_busy")]
    for r in rows:
        t = r["trace"]
        dt = t["bin_ms"]
        x = [k * dt / 1e3 for k in range(len(t["kernel_busy"]))]
        fig, ax = plt.subplots(2, 1, figsize=(11, 5), sharex=True)
        ax[0].plot(x, t["h2d_GB_s"], lw=0.8, label="host->GPU (trace)")
        ax[0].axhline(c["h2d"] / 1e9, color="k", ls="--", lw=0.8, label=f"ceiling {c['h2d'] / 1e9:.1f} GB/s")
        ax[0].set_ylabel("GB/s")
        ax[0].legend(loc="upper right")
        ax[1].plot(x, t["kernel_busy"], lw=0.8, color="tab:green")
        ax[1].set_ylabel("GPU busy (kernels)")
        ax[1].set_ylim(0, 1.05)
        ax[1].set_xlabel(f"seconds into the profiled generation ({dt:g} ms bins)")
        over = t["h2d_overlapped_s"] / t["h2d_s"] if t["h2d_s"] else 0.0
        fig.suptitle(f"{result['machine']}: {r['config']} batch {r['batch']}; copies {t['h2d_bytes'] / 1e9:.1f} GB "
                     f"in {t['h2d_s']:.2f} s, {over:.0%} of copy time under a kernel; kernels busy "
                     f"{t['kernel_s']:.2f} s of {t['span_s']:.2f} s", fontsize=9)
        fig.tight_layout()
        p = os.path.join(out_dir, f"{r['config']}_b{r['batch']}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        result = json.load(f)
    for p in plot(result, argv[1]):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

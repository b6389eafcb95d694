"""Run the notebooks' code cells top to bottom in IPython's shell (for machines without a Jupyter kernel, e.g. the GPU
machine): one shell per notebook, matplotlib's Agg backend, each figure saved as a PNG, a line per cell with its time.

    DSJAX_STORE=/path/to/store python bench/run_notebooks.py --out DIR [NOTEBOOK ...]

CI executes the same notebooks through nbclient (tests/test_notebooks.py); this runner is the GPU evidence.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run(path: str, out: str) -> bool:
    """Each code cell through IPython's InteractiveShell (magics and get_ipython() work as in Jupyter)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from IPython.core.interactiveshell import InteractiveShell
    name = os.path.splitext(os.path.basename(path))[0]
    cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]

    class Shell(InteractiveShell):
        def enable_gui(self, gui=None):           # no event loop to start outside Jupyter
            pass

        def enable_matplotlib(self, gui=None):    # %matplotlib inline would close the figures before they are saved
            return gui, "agg"

    InteractiveShell.clear_instance()                # the previous notebook's shell
    shell = Shell.instance()
    for n, cell in enumerate(cells):
        t0 = time.perf_counter()
        plt.show = lambda *a, **k: None                       # figures are saved below
        res = shell.run_cell("".join(cell["source"]), store_history=False)
        for k, num in enumerate(plt.get_fignums()):
            plt.figure(num).savefig(os.path.join(out, f"{name}_cell{n}_{k}.png"), dpi=80)
        plt.close("all")
        if not res.success:
            print(f"[notebooks] {name} cell {n}: FAILED after {time.perf_counter() - t0:.1f} s", flush=True)
            return False
        print(f"[notebooks] {name} cell {n}: ok in {time.perf_counter() - t0:.1f} s", flush=True)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", default=sorted(glob.glob(os.path.join(HERE, "..", "notebooks", "*.ipynb"))))
    ap.add_argument("--out", default=".", help="directory for the figures")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    ok = [run(p, args.out) for p in args.notebooks]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Convert a Hugging Face DeepSeek checkpoint into a dsjax FP4 store (the same as `dsjax convert`).

    python checkpoints/convert.py SRC DST --format nvfp4|mxfp4 [--policy experts|mlp|all|all+lm_head]

The work is done by dsjax.store.writer.convert; this script only hands its arguments to the dsjax CLI.
"""

import sys

from dsjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

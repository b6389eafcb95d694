"""dsjax against what users would run instead (issue 5, comparison 3): transformers + accelerate offloading on a
DeepSeek-V2-Lite-shaped model, same machine, same budgets, same run.

Steps, each skipped when its output is already there (rerun the same command to resume after a time limit):
  1. the bf16 HF checkpoint (bench/make_v2_lite_hf.py, ~31 GB)          WORK/hf
  2. its NVFP4 store (dsjax convert)                                     WORK/store
  3. for each budget (GPU/host pairs): dsjax bench (budget, load-on-demand and all-resident configs, batch 1) and
     transformers + accelerate (bench/hf_baseline.py in a subprocess, GPU and CPU memory capped, disk offload
     folder); the page cache is dropped before each system's measurement.
Results accumulate in OUT (JSON); a markdown table is printed at the end.

    python3 bench/v2_lite_compare.py /tmp/v2l --out $OUT/v2l.json --budgets 16GB:96GB,4GB:8GB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HERE = os.path.dirname(os.path.abspath(__file__))


def load(out: str) -> dict:
    if os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    return {"runs": {}}


def save(out: str, result: dict) -> None:
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)


def step(cmd: list[str], timeout: float) -> tuple[int, str]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"timed out after {timeout:.0f} s: {e.stdout or ''}{e.stderr or ''}"
    print(f"[v2-lite] {' '.join(cmd[:3])} ... rc {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    return rc, text


def gib(s: str) -> str:
    """dsjax budget string (e.g. 16GB = 16e9 bytes) -> accelerate's spelling of the same byte count."""
    from dsjax.runtime.planner import parse_bytes
    return f"{parse_bytes(s, 'budget') / 2**30:.3f}GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", help="work directory (checkpoint, store, offload folder)")
    ap.add_argument("--out", required=True, help="results JSON (resumed when present)")
    ap.add_argument("--budgets", default="16GB:96GB,4GB:8GB", help="GPU:host pairs, comma separated")
    ap.add_argument("--tokens", type=int, default=8, help="decode tokens per measurement")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--hf-timeout", type=float, default=240, help="seconds allowed to one transformers run")
    ap.add_argument("--systems", default="dsjax,hf")
    args = ap.parse_args(argv)
    from dsjax.runtime.bench import bench, drop_page_cache
    hf, store = os.path.join(args.work, "hf"), os.path.join(args.work, "store")
    result = load(args.out)
    if not os.path.exists(os.path.join(hf, "model.safetensors.index.json")):
        rc, text = step([sys.executable, os.path.join(HERE, "make_v2_lite_hf.py"), hf, "--layers", str(args.layers)],
                        3600)
        if rc:
            raise SystemExit(f"generating the checkpoint failed:\n{text[-3000:]}")
    if not os.path.exists(os.path.join(store, "manifest.json")):
        t0 = time.perf_counter()
        rc, text = step([sys.executable, "-m", "dsjax.cli", "convert", hf, store, "--format", "nvfp4",
                         "--no-progress"], 3600)
        if rc:
            raise SystemExit(f"converting failed:\n{text[-3000:]}")
        result["convert_s"] = time.perf_counter() - t0
        save(args.out, result)
    systems = args.systems.split(",")
    for pair in args.budgets.split(","):
        gpu, host = pair.split(":")
        key = f"{gpu}:{host}"
        runs = result["runs"].setdefault(key, {})
        if "dsjax" in systems and "dsjax" not in runs:
            drop_page_cache()
            runs["dsjax"] = bench(store, gpu_memory=gpu, host_memory=host, batches=(1,), prompt_len=args.prompt_len,
                                  tokens=args.tokens, trace=False, out=args.out + f".dsjax-{gpu}-{host}.json")
            save(args.out, result)
        if "hf" in systems and "hf" not in runs:
            drop_page_cache()
            off = os.path.join(args.work, f"offload-{gpu}-{host}")
            rc, text = step([sys.executable, os.path.join(HERE, "hf_baseline.py"), hf, "--gpu-memory", gib(gpu),
                             "--cpu-memory", gib(host), "--offload", off, "--tokens", str(args.tokens),
                             "--prompt-len", str(args.prompt_len)], args.hf_timeout)
            lines = [ln for ln in text.splitlines() if ln.startswith("{")]
            runs["hf"] = json.loads(lines[-1]) if rc == 0 and lines else {"error": f"rc {rc}", "tail": text[-2000:]}
            save(args.out, result)
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = ["| GPU:host budget | system | TTFT s | decode tok/s | decode vs transformers |", "|---|---|---|---|---|"]
    for key, runs in result["runs"].items():
        hf = runs.get("hf", {})
        hf_tok = hf.get("decode_tok_s")
        if hf_tok:
            lines.append(f"| {key} | transformers+accelerate (bf16) | {hf['ttft_s']:.2f} | {hf_tok:.3f} | 1x |")
        elif hf:
            lines.append(f"| {key} | transformers+accelerate (bf16) | - | {hf.get('error')} | - |")
        for r in runs.get("dsjax", {}).get("rows", []):
            ratio = f"{r['decode_tok_s'] / hf_tok:.1f}x" if hf_tok else "-"
            lines.append(f"| {key} | dsjax {r['config']} (NVFP4) | {r['ttft_ms'] / 1e3:.2f} | {r['decode_tok_s']:.3f} "
                         f"| {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

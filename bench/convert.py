"""Conversion throughput (MB/s of input) and peak memory of `dsjax convert` on a generated checkpoint, and the
speed of the synthetic V3-slice writer (bench/make_v3_slice.py), for each number of worker threads.

Generates (once) a bf16 DeepSeek-V3-architecture checkpoint of a few hundred MB with random weights through
dsjax/store/hf_write.py (a wider config than the tests': hidden 1024, 32 experts of 512, vocab 16384), then converts
it in a fresh subprocess per (format, policy, workers) so the measurement holds only the conversion. The V3 slice
(real width: 1 dense + 1 MoE layer of 32 experts, ~5 GB, generated NVFP4) is written the same way. Reports:

    MB/s          input bytes (safetensors tensors read) / wall time of convert()
    peak anon     peak of RssAnon sampled every 10 ms minus RssAnon before convert(): the converter's own memory
                  (numpy arrays, orbax/TensorStore buffers), which the stated bound is about
    peak RSS      VmHWM of the process (not ru_maxrss, which Linux carries over from the parent across fork+exec):
                  also counts shared libraries and the source's memory-mapped pages, clean page cache the kernel
                  reclaims at will (they grow with whatever was read, not with what the converter holds)
    bound         writer.py's bound for this model: largest core unit as stored (twice where orbax copies it) +
                  workers x 6 x the largest quantized matrix (tensor or expert) in float32, at most one band
                  (64 MiB) + 2 x workers x one routed expert as stored + 256 MB for library buffers

Writes to stdout and bench/RESULTS_convert.md (text after its KEEP line is kept: measurements made elsewhere).

    .venv/bin/python bench/convert.py [--workdir /tmp/dsjax-bench-convert] [--workers 1,2] [--no-slice]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=16384, hidden_size=1024,
    intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=4, first_k_dense_replace=1,
    num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
    rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
# (checkpoint, format, policy): the larger checkpoint has 2x the experts and 5/3 the MoE layers (2.6x the input);
# peak anonymous memory should not follow it.
SIZES = {"A": dict(n_routed_experts=32, num_hidden_layers=4), "B": dict(n_routed_experts=64, num_hidden_layers=6)}
RUNS = (("A", "nvfp4", "mlp"), ("A", "mxfp4", "all"), ("B", "nvfp4", "mlp"))
SLICE = dict(moe_layers=1, experts=32)
KEEP = "<!-- bench/convert.py rewrites the text above this line and keeps the text below it -->"


def generate(path: str, size: dict) -> None:
    import numpy as np
    sys.path.insert(0, ROOT)
    from dsjax.config import ModelConfig
    from dsjax.model.weights import random_weights
    from dsjax.store.hf_write import hf_tensors, write_hf_checkpoint
    cfg_dict = dict(CONFIG, **size)
    cfg = ModelConfig.from_dict(cfg_dict)
    tensors = hf_tensors(cfg, random_weights(cfg, seed=0, dtype=np.float32))
    write_hf_checkpoint(path, cfg_dict, tensors, shard_bytes=200 << 20)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rss_anon_kb() -> int:
    return _status_kb("RssAnon")


def _timed(fn):
    """fn() with its wall time and the peak anonymous RSS above the baseline (sampled every 10 ms)."""
    import orbax.checkpoint  # noqa: F401  (import cost outside the timed region)
    import tensorstore  # noqa: F401
    base = _rss_anon_kb()
    base_rss = _status_kb("VmRSS")
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon_kb())
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    return out, dict(wall_s=wall, peak_anon_mb=(peak[0] - base) / 1e3, peak_rss_mb=_status_kb("VmHWM") / 1e3,
                     base_rss_mb=base_rss / 1e3)


def orbax_copies() -> bool:
    """Whether this orbax deep-copies arrays it saves (no `deepcopy_host_arrays` switch; writer._save_orbax)."""
    import orbax.checkpoint as ocp
    try:
        ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
        return False
    except TypeError:
        return True


def bound_bytes(m, workers: int, band_bytes: int = 64 << 20) -> tuple[int, int]:
    """(largest core unit as stored, writer.py's peak-memory bound) for a store's manifest."""
    import numpy as np
    units: dict[str, int] = {}
    for r in m.tensors.values():
        if r.tier == "core":
            units[r.unit] = units.get(r.unit, 0) + r.bytes
    experts = [r for r in m.tensors.values() if r.tier == "experts"]
    matrix_f32 = max([4 * int(np.prod(r.shape[-2:])) for r in m.tensors.values() if r.is_fp4] + [0])
    expert_stored = max([r.bytes // r.shape[0] for r in experts] + [0])
    core = max(units.values())
    held = core * (2 if orbax_copies() else 1)
    return core, held + workers * 6 * min(band_bytes, matrix_f32) + 2 * workers * expert_stored + 256 * 10**6


def measure(src: str, dst: str, fmt: str, policy: str, workers: str) -> dict:
    """Runs in a fresh process: convert once, sampling anonymous RSS."""
    sys.path.insert(0, ROOT)
    from dsjax.store.safetensors_io import Checkpoint
    from dsjax.store.writer import convert
    ck = Checkpoint(src)
    input_bytes = ck.total_bytes
    ck.close()
    m, r = _timed(lambda: convert(src, dst, fmt, policy, progress=False, workers=int(workers)))
    core, bound = bound_bytes(m, int(workers))
    return dict(r, fmt=fmt, policy=policy, workers=int(workers), input_mb=input_bytes / 1e6,
                store_mb=m.totals()["bytes"] / 1e6, mb_s=input_bytes / 1e6 / r["wall_s"],
                largest_core_unit_mb=core / 1e6, bound_mb=bound / 1e6)


def measure_slice(dst: str, workers: str) -> dict:
    """Runs in a fresh process: write the V3 slice (bench/make_v3_slice.py's job) once."""
    sys.path.insert(0, ROOT)
    from dsjax.store.synthetic import SyntheticSource, v3_slice_config
    from dsjax.store.writer import convert
    config = v3_slice_config(SLICE["moe_layers"], n_routed_experts=SLICE["experts"])
    src = SyntheticSource(config, dst + "-src", policy="mlp", workers=int(workers))
    m, r = _timed(lambda: convert(src, dst, "nvfp4", "mlp", progress=False, workers=int(workers)))
    core, bound = bound_bytes(m, int(workers))
    return dict(r, workers=int(workers), store_mb=m.totals()["bytes"] / 1e6,
                mb_s=m.totals()["bytes"] / 1e6 / r["wall_s"], largest_core_unit_mb=core / 1e6, bound_mb=bound / 1e6)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main() -> int:
    ap = argparse.ArgumentParser(description="dsjax convert throughput and peak memory")
    ap.add_argument("--workdir", default="/tmp/dsjax-bench-convert", help="where the checkpoint and stores go")
    ap.add_argument("--workers", default=None,
                    help="comma-separated worker counts to measure (default: 1 and dsjax's default, cores up to 16)")
    ap.add_argument("--no-slice", action="store_true", help="skip the V3 slice (writes ~5 GB)")
    ap.add_argument("--measure", nargs=5, metavar=("SRC", "DST", "FMT", "POLICY", "WORKERS"), help=argparse.SUPPRESS)
    ap.add_argument("--measure-slice", nargs=2, metavar=("DST", "WORKERS"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS_convert.md"), help="results file to write")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    if args.measure_slice:
        print(json.dumps(measure_slice(*args.measure_slice)))
        return 0
    sys.path.insert(0, ROOT)
    from dsjax.store.writer import default_workers
    workers = [int(w) for w in (args.workers or f"1,{default_workers()}").split(",")]
    workers = list(dict.fromkeys(workers))

    def run(cmd: list[str], dst: str) -> dict:
        subprocess.run(["rm", "-rf", dst, dst + "-src"], check=True)
        out = subprocess.run([sys.executable, __file__, *cmd], check=True, capture_output=True, text=True).stdout
        subprocess.run(["rm", "-rf", dst, dst + "-src"], check=True)
        return json.loads(out.strip().splitlines()[-1])

    rows = []
    for size, fmt, policy in RUNS:
        src = os.path.join(args.workdir, f"ckpt-{size}")
        if not os.path.exists(os.path.join(src, "config.json")):
            print(f"generating {src} ...", flush=True)
            generate(src, SIZES[size])
        for w in workers:
            dst = os.path.join(args.workdir, f"store-{size}-{fmt}-{policy}")
            rows.append(dict(run(["--measure", src, dst, fmt, policy, str(w)], dst), size=size))
            print(rows[-1], flush=True)
    slices = []
    if not args.no_slice:
        for w in workers:
            slices.append(run(["--measure-slice", os.path.join(args.workdir, "v3-slice"), str(w)],
                              os.path.join(args.workdir, "v3-slice")))
            print(slices[-1], flush=True)
    head = ("| ckpt | format | policy | workers | input MB | store MB | wall s | MB/s (input) | peak anon MB | "
            "peak RSS MB (after imports) | bound MB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r['size']} | {r['fmt']} | {r['policy']} | {r['workers']} | {r['input_mb']:.0f} | "
                      f"{r['store_mb']:.0f} | {r['wall_s']:.1f} | {r['mb_s']:.0f} | {r['peak_anon_mb']:.0f} | "
                      f"{r['peak_rss_mb']:.0f} ({r['base_rss_mb']:.0f}) | {r['bound_mb']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    slice_table = ""
    if slices:
        slice_table = "\n".join(
            ["| workers | store MB | wall s | MB/s (written) | peak anon MB | bound MB |", "|---|---|---|---|---|---|"]
            + [f"| {r['workers']} | {r['store_mb']:.0f} | {r['wall_s']:.1f} | {r['mb_s']:.0f} | "
               f"{r['peak_anon_mb']:.0f} | {r['bound_mb']:.0f} |" for r in slices])
        print(slice_table)
        slice_table = f"""
V3 slice at real width, written from generated weights (bench/make_v3_slice.py's work: 1 dense + {SLICE['moe_layers']}
MoE layer of {SLICE['experts']} experts, NVFP4, policy mlp; a fresh process per run):

{slice_table}
"""
    kept = ""
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = f.read()
        if KEEP in old:
            kept = old[old.index(KEEP) + len(KEEP):]
    text = f"""# dsjax convert: throughput and peak memory

- Date: {datetime.date.today().isoformat()}
- Machine: {machine()} (shared with other jobs while measured: throughput is a lower bound)
- Command: `.venv/bin/python bench/convert.py --workers {','.join(map(str, workers))}` (each conversion in a fresh
  process; input is bf16 safetensors in 200 MB shards, generated once with random weights: hidden 1024, vocab 16384,
  routed experts of 512; checkpoint A: 4 layers (1 dense), 32 experts; B: 6 layers, 64 experts)

{table}

- **MB/s (input)**: safetensors bytes read / wall time of `convert()`; `workers` threads quantize tensors and
  experts (numpy), the calling thread appends them in order (the store is byte-identical for any count).
- **peak anon**: the converter's own memory (anonymous RSS above the post-import baseline, sampled every 10 ms).
  The bound (dsjax/store/writer.py) is largest core unit as stored (twice with an orbax that copies it) + workers
  x 6 x the largest quantized matrix in float32 (at most one 64 MiB band) + 2 x workers x one routed expert as
  stored + 256 MB for library buffers; it does not grow with the number of layers or experts (compare A and B).
- **peak RSS** (VmHWM; in brackets VmRSS after importing jax/orbax/TensorStore, before converting) also counts
  shared libraries and the source's memory-mapped pages (clean page cache, reclaimable), so it tracks input size.
{slice_table}
{KEEP}{kept}"""
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

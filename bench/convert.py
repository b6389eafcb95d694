"""Conversion throughput (MB/s of input) and peak memory of `dsjax convert` on a generated checkpoint.

Generates (once) a bf16 DeepSeek-V3-architecture checkpoint of a few hundred MB with random weights through
dsjax/store/hf_write.py (a wider config than the tests': hidden 1024, 32 experts of 512, vocab 16384), then converts
it in a fresh subprocess per (format, policy) so the measurement holds only the conversion. Reports:

    MB/s          input bytes (safetensors tensors read) / wall time of convert()
    peak anon     peak of RssAnon sampled every 10 ms minus RssAnon before convert(): the converter's own memory
                  (numpy arrays, orbax/TensorStore buffers), which the stated bound is about
    peak RSS      VmHWM of the process (not ru_maxrss, which Linux carries over from the parent across fork+exec):
                  also counts shared libraries and the source's memory-mapped pages, clean page cache the kernel
                  reclaims at will (they grow with whatever was read, not with what the converter holds)
    bound         writer.py's bound for this model: largest core unit as stored + one routed expert's float32 copy
                  x 6 (quantization temporaries) + one band (64 MiB) x 6

Writes to stdout and bench/RESULTS_convert.md.

    .venv/bin/python bench/convert.py [--workdir /tmp/dsjax-bench-convert]
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


def measure(src: str, dst: str, fmt: str, policy: str) -> dict:
    """Runs in a fresh process: convert once, sampling anonymous RSS."""
    sys.path.insert(0, ROOT)
    import numpy as np
    from dsjax.store.safetensors_io import Checkpoint
    from dsjax.store.writer import convert
    import orbax.checkpoint  # noqa: F401  (import cost outside the timed region)
    import tensorstore  # noqa: F401
    ck = Checkpoint(src)
    input_bytes = ck.total_bytes
    ck.close()
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
    m = convert(src, dst, fmt, policy, progress=False)
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    units: dict[str, int] = {}
    for r in m.tensors.values():
        if r.tier == "core":
            units[r.unit] = units.get(r.unit, 0) + r.bytes
    expert_f32 = max(4 * int(np.prod(r.shape[1:])) for r in m.tensors.values() if r.tier == "experts")
    bound = max(units.values()) + 6 * expert_f32 + 6 * (64 << 20)
    return dict(fmt=fmt, policy=policy, input_mb=input_bytes / 1e6, store_mb=m.totals()["bytes"] / 1e6,
                wall_s=wall, mb_s=input_bytes / 1e6 / wall, peak_anon_mb=(peak[0] - base) / 1e3,
                peak_rss_mb=_status_kb("VmHWM") / 1e3, base_rss_mb=base_rss / 1e3,
                largest_core_unit_mb=max(units.values()) / 1e6, bound_mb=bound / 1e6)


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
    ap.add_argument("--measure", nargs=4, metavar=("SRC", "DST", "FMT", "POLICY"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS_convert.md"), help="results file to write")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    rows = []
    for size, fmt, policy in RUNS:
        src = os.path.join(args.workdir, f"ckpt-{size}")
        if not os.path.exists(os.path.join(src, "config.json")):
            print(f"generating {src} ...", flush=True)
            generate(src, SIZES[size])
        dst = os.path.join(args.workdir, f"store-{size}-{fmt}-{policy}")
        subprocess.run(["rm", "-rf", dst], check=True)
        out = subprocess.run([sys.executable, __file__, "--measure", src, dst, fmt, policy], check=True,
                             capture_output=True, text=True).stdout
        rows.append(dict(json.loads(out.strip().splitlines()[-1]), size=size))
        subprocess.run(["rm", "-rf", dst], check=True)
    head = ("| ckpt | format | policy | input MB | store MB | wall s | MB/s (input) | peak anon MB | peak RSS MB "
            "(after imports) | bound MB |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r['size']} | {r['fmt']} | {r['policy']} | {r['input_mb']:.0f} | {r['store_mb']:.0f} | "
                      f"{r['wall_s']:.1f} | {r['mb_s']:.0f} | {r['peak_anon_mb']:.0f} | {r['peak_rss_mb']:.0f} "
                      f"({r['base_rss_mb']:.0f}) | {r['bound_mb']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    text = f"""# dsjax convert: throughput and peak memory

- Date: {datetime.date.today().isoformat()}
- Machine: {machine()} (shared with other jobs while measured: throughput is a lower bound)
- Command: `.venv/bin/python bench/convert.py` (each conversion in a fresh process; input is bf16 safetensors in
  200 MB shards, generated once with random weights: hidden 1024, vocab 16384, routed experts of 512; checkpoint A:
  4 layers (1 dense), 32 experts; B: 6 layers, 64 experts)

{table}

- **MB/s (input)**: safetensors bytes read / wall time of `convert()`, single-threaded numpy quantization.
- **peak anon**: the converter's own memory (anonymous RSS above the post-import baseline, sampled every 10 ms).
  The bound (dsjax/store/writer.py) is largest core unit as stored + 6 x one routed expert in float32 + 6 x one
  64 MiB quantization band; it does not grow with the number of layers or experts (compare A and B).
- **peak RSS** (VmHWM; in brackets VmRSS after importing jax/orbax/TensorStore, before converting) also counts
  shared libraries and the source's memory-mapped pages (clean page cache, reclaimable), so it tracks input size.
"""
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

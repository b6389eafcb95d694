"""memory_config.active_experts = k: each token routed to the top k of the model's own selection, renormalised as the
model renormalises its K (issue 20, item 3).

The oracle for the routing is a numpy transcription of reference/deepseek-spec.md §2.8 (float64) over the router,
bias and routing numbers read straight from the store's config.json, applied to the normed hidden states the engine's
own attention program hands its router; it shares no code with dsjax.model.moe. Model: the embedded trained tiny model
(16 routed experts, top-4, 4 groups of which 2 are kept, sigmoid scores with e_score_correction_bias,
norm_topk_prob, routed_scaling_factor 2.5) as an NVFP4 store.
"""

# T tokens, D hidden, E experts, G groups, K top-k

from __future__ import annotations

import numpy as np
import pytest

import dsjax
from dsjax.demo import embedded_checkpoint, ensure_demo_store
from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
from dsjax.runtime.tiered import model_bytes_from_store
from dsjax.store.reader import Store
from tolerances import TOL

PROMPTS = [[5, 17, 301, 44, 9, 120, 7], [260, 33, 12, 981, 4]]
NEW = 6
MARGIN = 1e-4        # tokens whose k-th / (k+1)-th selection score, or kept / dropped group score, lie closer are ties


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ensure_demo_store(str(tmp_path_factory.mktemp("active") / "tiny-nvfp4"))


@pytest.fixture(scope="module")
def raw_config(store):
    return Store(store).manifest.model_config          # the checkpoint's config.json as written


def _load(store, **kw):
    return dsjax.load(store, dtype="float32", max_context=256, **kw)


def _greedy(engine) -> list[list[int]]:
    return [g.token_ids for g in engine.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=())]


@pytest.fixture(scope="module")
def full(store):
    """The model as it is (active_experts unset): tokens and logits of PROMPTS[0]."""
    e = _load(store)
    out = (_greedy(e), e.logits(np.asarray([PROMPTS[0]])))
    e.close()
    return out


# ---- (a) k = K is the model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 4])
def test_k_equal_to_the_models_gives_the_same_tokens(store, full, k):
    e = _load(store, active_experts=k)
    assert e.config.num_experts_per_tok == 4 and e.model_bytes.top_k == 4
    assert _greedy(e) == full[0]
    np.testing.assert_array_equal(e.logits(np.asarray([PROMPTS[0]])), full[1])
    assert "note" not in e.stats()["routing"]
    e.close()


# ---- (b) k < K routes as the spec's formulas say ------------------------------------------------------------------

def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def oracle_route(hn: np.ndarray, router: np.ndarray, bias: np.ndarray, raw: dict, k: int):
    """reference/deepseek-spec.md §2.8 for a sigmoid / noaux_tc model, cut to the top k: (ids [T, k], weights [T, k],
    tie mask [T]: True where the choice is decided by less than MARGIN)."""
    E, G, TG = raw["n_routed_experts"], raw["n_group"], raw["topk_group"]
    assert raw["scoring_func"] == "sigmoid" and raw["topk_method"] == "noaux_tc"
    s = _sigmoid(hn.astype(np.float64) @ router.astype(np.float64).T)           # [T, E] unbiased scores
    sel = s + bias.astype(np.float64)[None]                                      # biased: selection only
    T = s.shape[0]
    g = sel.reshape(T, G, E // G)
    group_score = np.sort(g, -1)[..., -2:].sum(-1)                               # sum of the 2 best biased scores
    order_g = np.argsort(-group_score, -1, kind="stable")
    kept = np.zeros((T, G), bool)
    kept[np.arange(T)[:, None], order_g[:, :TG]] = True
    masked = np.where(kept[:, :, None], g, -np.inf).reshape(T, E)                # dropped groups at -inf
    order = np.argsort(-masked, -1, kind="stable")
    ids = order[:, :k]
    w = np.take_along_axis(s, ids, -1)                                           # weights from UNBIASED scores
    if raw["norm_topk_prob"]:
        w = w / w.sum(-1, keepdims=True)
    w = w * raw["routed_scaling_factor"]
    ranked = np.take_along_axis(masked, order, -1)
    gs = np.take_along_axis(group_score, order_g, -1)
    tie = (ranked[:, k - 1] - ranked[:, k] < MARGIN) | (gs[:, TG - 1] - gs[:, TG] < MARGIN)
    return ids, w, tie


class _Recorder:
    """The engine's LayerPrograms with every MoE attention call's (router, bias, hn, ids, weights) kept."""

    def __init__(self, programs):
        self._programs, self.calls = programs, []

    def __getattr__(self, name):
        return getattr(self._programs, name)

    def attn(self, w, *args, kind, form):
        out = self._programs.attn(w, *args, kind=kind, form=form)
        if kind == "moe":
            _, hn, _, idx, weight, _, _ = out
            self.calls.append((np.asarray(w["router"]), np.asarray(w["router_bias"]),
                               np.asarray(hn).reshape(-1, hn.shape[-1]), np.asarray(idx), np.asarray(weight)))
        return out


@pytest.mark.parametrize("k", [1, 2, 4])
def test_routing_equals_the_spec_oracle(store, raw_config, k):
    """Every MoE layer call of a real generation (prefill and decode) under active_experts = k routes every token to
    the oracle's k experts in its order, with its weights (k = 4 checks the oracle against the model itself)."""
    e = _load(store, active_experts=k)
    rec = e.sched = _Recorder(e.sched)
    _greedy(e)
    assert len(rec.calls) >= 3 * (1 + NEW - 1)             # 3 MoE layers x (prefill + decode steps)
    checked = ties = 0
    for router, bias, hn, idx, weight in rec.calls:
        assert idx.shape == weight.shape == (hn.shape[0], k)
        want_ids, want_w, tie = oracle_route(hn, router, bias, raw_config, k)
        np.testing.assert_array_equal(idx[~tie], want_ids[~tie])
        err = np.abs(weight[~tie] - want_w[~tie]).max(initial=0.0) / raw_config["routed_scaling_factor"]
        assert err <= TOL["routing_weights_f32"], f"k={k}: weights differ from the oracle by max-abs {err:.2e}"
        checked, ties = checked + int((~tie).sum()), ties + int(tie.sum())
    assert checked >= 9 * ties and checked > 100, (checked, ties)
    if k == 1:      # the model normalises its top-4, so a lone expert carries the whole routed_scaling_factor
        np.testing.assert_allclose(np.concatenate([c[4] for c in rec.calls]), raw_config["routed_scaling_factor"],
                                   rtol=1e-6)
    e.close()


# ---- (c) the tiers do not change what k computes ------------------------------------------------------------------

def test_tiered_tokens_equal_the_in_memory_engines_with_the_same_k(store, full):
    k = 2
    mb = model_bytes_from_store(Store(store)).with_top_k(k)
    tight = dict(max_gpu_layers=1, prefetch_layers=1)
    budget = dict(gpu_memory=minimum_gpu_memory(mb, context_tokens=256, **tight),
                  host_memory=minimum_host_memory(mb), **tight)
    tiered = _load(store, active_experts=k, **budget)
    ref = dsjax.load(store, dtype="float32", in_memory=True, active_experts=k)
    got = _greedy(tiered)
    assert got == _greedy(ref)
    assert got != full[0]                                    # k = 2 is not the model: the option does something
    s = tiered.stats()
    assert s["links"]["disk->host"]["bytes"] > 0 and s["links"]["host->GPU"]["bytes"] > 0
    assert tiered.placement.host_experts < tiered.config.n_routed_experts        # experts come back from disk
    assert s["routing"]["active_experts"] == k and s["routing"]["model_experts_per_tok"] == 4
    assert "below the model's num_experts_per_tok=4" in s["routing"]["note"]
    assert ref.stats()["routing"]["active_experts"] == k
    tiered.close(), ref.close()


def test_planner_bytes_per_token_drop_with_k(store, capsys):
    """The plan's routed-expert bytes per token scale with k, in the engine and in `dsjax plan --active-experts`."""
    st = Store(store)
    mb = model_bytes_from_store(st)
    moe = len(mb.moe_layers)
    e4, e2 = _load(store), _load(store, active_experts=2)
    assert e4.placement.hbm_bytes_per_token - e2.placement.hbm_bytes_per_token == 2 * mb.expert * moe
    assert e2.model_bytes.routed_bytes_per_token == 2 * mb.expert * moe
    e4.close(), e2.close()
    from dsjax.cli import main
    assert main(["plan", store, "--active-experts", "2"]) == 0
    out = capsys.readouterr().out
    assert "top-2)" in out and "active_experts=2 is below the model's top-4" in out
    assert main(["plan", store, "--active-experts", "5"]) == 2
    assert "active_experts=5 is outside 1..4" in capsys.readouterr().err


# ---- (d) bad values -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, says", [(5, "active_experts=5 is outside 1..4"), (-1, "active_experts=-1 (must be >= 0|is outside 1..4)"),
                                       ("2", "active_experts='2' has the wrong type"),
                                       (True, "active_experts=True has the wrong type")])
def test_a_bad_value_is_an_error_naming_the_key(store, bad, says):
    for kw in ({}, {"in_memory": True}):
        with pytest.raises(ValueError, match=f"memory_config.{says}"):
            dsjax.load(store, active_experts=bad, **kw)


def test_a_bad_value_fails_before_a_checkpoint_is_read():
    """A Hugging Face checkpoint takes the option too; a value outside the range fails before any weight is read."""
    with pytest.raises(ValueError, match=r"memory_config.active_experts=9 is outside 1..4.*choose k in 1..4"):
        dsjax.load(embedded_checkpoint(), active_experts=9)

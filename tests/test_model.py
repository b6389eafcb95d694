"""Model math invariants: MLA forms agree, absorbed decode after prefill equals the full forward, chunked prefill,
one compile per layer kind, and routing against an independent per-token implementation of deepseek-spec.md §2.8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import forward, init_layer_cache, layer_step, random_weights, route
from dsjax.model.transformer import embed_step, head_step
from model_configs import CONFIGS, config
from tolerances import assert_close


def _weights(cfg, seed=0):
    return jax.tree.map(jnp.asarray, random_weights(cfg, seed=seed, dtype=np.float32))


def _run(cfg, w, tokens, positions, caches, form):
    x = embed_step(w["embed"], jnp.asarray(tokens), jnp.float32)
    for i, lw in enumerate(w["layers"]):
        x, caches[i], _ = layer_step(lw, x, caches[i], jnp.asarray(positions), cfg, cfg.layer_kind(i), form)
    return np.asarray(head_step(w["final_norm"], w["lm_head"], x, cfg))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_naive_and_absorbed_prefill_agree(name):
    cfg = config(name)
    w = _weights(cfg)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40)))
    assert_close(forward(w, ids, cfg, "absorbed"), forward(w, ids, cfg, "naive"), "mla_forms_f32", name)


@pytest.mark.parametrize("name", ["v3", "v2_lite", "moonlight"])
@pytest.mark.parametrize("prefill_form", ["naive", "absorbed"])
def test_decode_after_prefill_equals_full_forward(name, prefill_form):
    """Prefill P tokens, then feed the rest one at a time through the absorbed compressed cache."""
    cfg = config(name)
    w = _weights(cfg)
    B, P, T, S = 2, 9, 44, 64  # T > original_max_position_embeddings (32): yarn's interpolated band is used
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    full = np.asarray(forward(w, jnp.asarray(ids), cfg, "naive"))
    caches = [init_layer_cache(B, S, cfg, jnp.float32) for _ in range(cfg.num_hidden_layers)]
    got = [_run(cfg, w, ids[:, :P], np.broadcast_to(np.arange(P), (B, P)), caches, prefill_form)]
    for t in range(P, T):
        got.append(_run(cfg, w, ids[:, t:t + 1], np.full((B, 1), t), caches, "absorbed"))
    assert_close(np.concatenate(got, axis=1), full, "decode_vs_forward_f32", f"{name} decode")


def test_chunked_prefill_with_offset():
    """A second prefill chunk starting at position > 0 sees the first chunk through the cache."""
    cfg = config("v3")
    w = _weights(cfg)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 30)).astype(np.int32)
    full = np.asarray(forward(w, jnp.asarray(ids), cfg, "naive"))
    for form in ("naive", "absorbed"):
        caches = [init_layer_cache(1, 32, cfg, jnp.float32) for _ in range(cfg.num_hidden_layers)]
        a = _run(cfg, w, ids[:, :12], np.arange(12)[None], caches, form)
        b = _run(cfg, w, ids[:, 12:], np.arange(12, 30)[None], caches, form)
        assert_close(np.concatenate([a, b], 1), full, "decode_vs_forward_f32", f"chunked {form}")


def test_rows_at_different_positions_decode_independently():
    """Batch rows at different cache positions (ragged prompts) give each row's own single-sequence result."""
    cfg = config("moonlight")
    w = _weights(cfg)
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, cfg.vocab_size, 20), rng.integers(0, cfg.vocab_size, 13)
    fa = np.asarray(forward(w, jnp.asarray(a[None]), cfg))[0]
    fb = np.asarray(forward(w, jnp.asarray(b[None]), cfg))[0]
    toks = np.zeros((2, 20), np.int32)
    toks[0], toks[1, :12] = a, b[:12]
    caches = [init_layer_cache(2, 32, cfg, jnp.float32) for _ in range(cfg.num_hidden_layers)]
    _run(cfg, w, toks[:, :12], np.broadcast_to(np.arange(12), (2, 12)), caches, "naive")
    # row 0 continues at position 12 with a's token, row 1 at position 12 with b's last token; then row 0 goes on
    out = _run(cfg, w, np.array([[a[12]], [b[12]]]), np.array([[12], [12]]), caches, "absorbed")
    assert_close(out[1, 0], fb[12], "decode_vs_forward_f32", "row 1")
    assert_close(out[0, 0], fa[12], "decode_vs_forward_f32", "row 0")
    out = _run(cfg, w, np.array([[a[13]], [b[0]]]), np.array([[13], [13]]), caches, "absorbed")
    assert_close(out[0, 0], fa[13], "decode_vs_forward_f32", "row 0 step 2")


def test_one_compile_per_layer_kind():
    cfg = config("v3", num_hidden_layers=5)  # 1 dense + 4 MoE layers
    w = _weights(cfg)
    before = layer_step._cache_size()
    forward(w, jnp.zeros((1, 7), jnp.int32), cfg, "naive")
    assert layer_step._cache_size() - before == 2  # one executable for dense, one for MoE


# ---- routing against an independent, per-token implementation of spec §2.8 ----------------------------------

def _route_one(logits, bias, cfg):
    """Plain-Python routing of one token (float64), written from the spec text."""
    E, K, G, TG = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    if cfg.scoring_func == "sigmoid":
        s = 1 / (1 + np.exp(-logits))
    else:
        s = np.exp(logits - logits.max())
        s = s / s.sum()
    sel = s + bias if cfg.topk_method == "noaux_tc" else s.copy()
    candidates = list(range(E))
    if G > 1 and cfg.topk_method != "greedy":
        per = E // G
        gscore = []
        for g in range(G):
            vals = sorted(sel[g * per:(g + 1) * per], reverse=True)
            gscore.append(vals[0] + vals[1] if cfg.topk_method == "noaux_tc" else vals[0])
        keep = sorted(range(G), key=lambda g: -gscore[g])[:TG]
        candidates = [e for e in range(E) if e // per in keep]
    chosen = sorted(candidates, key=lambda e: -sel[e])[:K]
    wts = np.array([s[e] for e in chosen])
    if cfg.norm_topk_prob and K > 1:
        wts = wts / (wts.sum() + 1e-20)
    return dict(zip(chosen, wts * cfg.routed_scaling_factor))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_routing_matches_per_token_reference(name):
    cfg = config(name)
    rng = np.random.default_rng(5)
    T, D, E = 64, cfg.hidden_size, cfg.n_routed_experts
    x = rng.standard_normal((T, D)).astype(np.float32)
    router = (rng.standard_normal((E, D)) * 0.3).astype(np.float32)
    # biases around -1 push s + bias below 0 inside kept groups: -inf masking (not 0) decides the selection there
    bias = (rng.standard_normal(E) * 0.5 - 1.0).astype(np.float32)
    r = route(jnp.asarray(x), jnp.asarray(router), jnp.asarray(bias), cfg)
    idx, wts = np.asarray(r.idx), np.asarray(r.weight)
    logits = x.astype(np.float64) @ router.T.astype(np.float64)
    for t in range(T):
        ref = _route_one(logits[t], bias.astype(np.float64), cfg)
        assert set(idx[t].tolist()) == set(ref), f"token {t}: {sorted(idx[t])} != {sorted(ref)}"
        got = dict(zip(idx[t].tolist(), wts[t].tolist()))
        np.testing.assert_allclose([got[e] for e in ref], list(ref.values()), rtol=2e-5,
                                   err_msg=f"token {t} weights")


def test_masked_groups_are_minus_inf_not_zero():
    """With all biased scores negative, zero-masking would pick experts from dropped groups; -inf never does."""
    cfg = config("v3")
    E, per = cfg.n_routed_experts, cfg.n_routed_experts // cfg.n_group
    x = jnp.ones((1, cfg.hidden_size))
    router = jnp.zeros((E, cfg.hidden_size))                    # every sigmoid score 0.5
    bias = -2.0 + 0.01 * jnp.arange(E, dtype=jnp.float32)      # s + bias < 0 everywhere; last groups best
    r = route(x, router, bias, cfg)
    kept_groups = set(range(cfg.n_group - cfg.topk_group, cfg.n_group))
    assert {int(e) // per for e in np.asarray(r.idx[0])} <= kept_groups


def test_query_block_halves_while_a_block_passes_the_limit():
    from dsjax.model.attention import query_block
    GiB = 1 << 30
    # V3, 128 heads, naive: scores + probabilities of a query at width S are 128 x 2S x 4 bytes
    assert query_block(1, 4096, 128, 4096) == 256                 # a 4,096-token prompt: 4 MiB a query -> 1 GiB
    assert query_block(16, 256, 128, 256) == 256                  # 16 chunk rows at a 256 width: one block of 1 GiB
    assert query_block(16, 256, 128, 512) == 128
    assert query_block(16, 256, 128, 4096, C=512) == 8            # absorbed: + queries and latent outputs (72 MiB)
    assert query_block(32, 1, 128, 4096, C=512) == 1              # decode: nothing to split
    assert query_block(2, 12, 4, 64, limit=3 * 2 * 4 * 128 * 4) == 3   # halved while even: 12 -> 6 -> 3
    assert query_block(2, 12, 4, 64, limit=1) == 3                # odd: as small as it goes
    assert 256 * 128 * 8192 * 4 == GiB


@pytest.mark.parametrize("form,paged", [("naive", False), ("absorbed", True)])
def test_attention_in_query_blocks_equals_one_block_and_holds_less(form, paged, monkeypatch):
    """Blocks of queries give the one-block output and cache (each query's softmax is over its own row), and the
    compiled program's temporaries shrink: XLA's memory analysis of the same call, limit lowered and not."""
    from dsjax.model import attention as mla
    cfg = config("v3")
    w = _weights(cfg)["layers"][0]
    rng = np.random.default_rng(5)
    B, T, start, page = 2, 128, 64, 16                           # a chunk at positions 64..191 after 64 cached
    S = start + T                                                # scores [2, 4, 128, 192] dominate the temporaries
    x = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), jnp.float32)
    positions = jnp.asarray(np.broadcast_to(np.arange(start, start + T), (B, T)))
    if paged:                                                     # 2 rows x 12 pages of 16 positions, shuffled
        n = 2 * S // page + 3
        cache = {"c": jnp.asarray(rng.standard_normal((n, page, cfg.kv_lora_rank)), jnp.float32),
                 "pe": jnp.asarray(rng.standard_normal((n, page, cfg.qk_rope_head_dim)), jnp.float32)}
        pages = jnp.asarray(rng.permutation(n)[:2 * S // page].reshape(B, S // page))
    else:
        cache = {"c": jnp.asarray(rng.standard_normal((B, S, cfg.kv_lora_rank)), jnp.float32),
                 "pe": jnp.asarray(rng.standard_normal((B, S, cfg.qk_rope_head_dim)), jnp.float32)}
        pages = None
    call = jax.jit(lambda w_, x_, c_, p_, pg: mla.attention(w_, x_, c_, p_, cfg, form, pg))
    whole = call.lower(w, x, cache, positions, pages).compile()
    out, new_cache = whole(w, x, cache, positions, pages)
    # a limit the naive keys and values just fit (1/4 of the whole call's scores): blocks of 16 queries (8 absorbed,
    # whose blocks hold more a query)
    H = cfg.num_attention_heads
    monkeypatch.setattr(mla, "SCORE_BLOCK_BYTES", B * S * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * 4 + 1)
    assert mla.attention_form(form, B, S, H, cfg.qk_nope_head_dim, cfg.v_head_dim) == form
    assert mla.query_block(B, T, H, S, cfg.kv_lora_rank if form == "absorbed" else 0) == (8 if form == "absorbed" else 16)
    call = jax.jit(lambda w_, x_, c_, p_, pg: mla.attention(w_, x_, c_, p_, cfg, form, pg))
    blocked = call.lower(w, x, cache, positions, pages).compile()
    out_b, cache_b = blocked(w, x, cache, positions, pages)
    np.testing.assert_allclose(np.asarray(out_b), np.asarray(out), rtol=1e-5, atol=1e-6)
    for k in ("c", "pe"):
        np.testing.assert_array_equal(np.asarray(cache_b[k]), np.asarray(new_cache[k]))
    scores = B * cfg.num_attention_heads * T * S * 4
    t_whole, t_blocked = (c.memory_analysis().temp_size_in_bytes for c in (whole, blocked))
    assert t_whole >= scores and t_whole - t_blocked >= scores // 2, (t_whole, t_blocked, scores)


def test_naive_attention_past_the_limit_runs_absorbed_and_holds_no_per_head_keys(monkeypatch):
    """A naive call whose per-head keys and values would pass the limit computes in the absorbed form: the same output
    as asking for it (bit for bit, one program), within the forms' tolerance of the naive one, with fewer temporaries."""
    from dsjax.model import attention as mla
    cfg = config("v3")
    w = _weights(cfg)["layers"][0]
    rng = np.random.default_rng(6)
    B, T, S = 4, 8, 64                                            # few queries, many positions: keys dominate
    H, N, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    x = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), jnp.float32)
    positions = jnp.asarray(np.broadcast_to(np.arange(S - T, S), (B, T)))
    cache = {"c": jnp.asarray(rng.standard_normal((B, S, cfg.kv_lora_rank)), jnp.float32),
             "pe": jnp.asarray(rng.standard_normal((B, S, cfg.qk_rope_head_dim)), jnp.float32)}

    def compiled(form):
        call = jax.jit(lambda w_, x_, c_, p_: mla.attention(w_, x_, c_, p_, cfg, form))
        return call.lower(w, x, cache, positions).compile()
    naive = compiled("naive")
    keys = B * S * H * (N + V) * 4
    assert mla.attention_form("naive", B, S, H, N, V) == "naive"
    monkeypatch.setattr(mla, "SCORE_BLOCK_BYTES", keys - 1)       # keys pass it; the scores ([4, 4, 8, 64]) do not
    assert mla.attention_form("naive", B, S, H, N, V) == "absorbed"
    assert mla.query_block(B, T, H, S, cfg.kv_lora_rank) == T
    switched, absorbed = compiled("naive"), compiled("absorbed")
    out_s, out_a, out_n = (np.asarray(c(w, x, cache, positions)[0]) for c in (switched, absorbed, naive))
    np.testing.assert_array_equal(out_s, out_a)
    assert_close(out_s, out_n, "mla_forms_f32", "switched vs naive")
    t_naive, t_switched = (c.memory_analysis().temp_size_in_bytes for c in (naive, switched))
    assert t_naive >= keys and t_naive - t_switched >= keys // 2, (t_naive, t_switched, keys)

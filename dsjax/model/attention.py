"""Multi-head latent attention (MLA) over a compressed KV cache, in the naive and the absorbed form.

The cache holds, per layer and token, the normed kv latent [C] and the rotated rope key [R] (576 values for V3),
at the token's absolute position: cache index == position. Prefill writes a chunk of positions and attends over
everything cached so far, so chunked prefill (start > 0) works in both forms. Math: reference/deepseek-spec.md
§2.3 (naive), §2.6 (absorbed).
"""

# B batch, T query tokens, S cached positions, D hidden, H heads, N nope dim, R rope dim, V value dim,
# C kv latent rank, Q q latent rank

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from dsjax import ops
from dsjax.config import ModelConfig
from dsjax.model.layers import LATENT_NORM_EPS, apply_rope, rms_norm, rope_cos_sin

MlaForm = Literal["naive", "absorbed"]
F32 = jnp.float32
# One attention call holds at most about this many bytes of f32 temporaries: its queries go in blocks (a power-of-two
# divisor of T, one block at a time) whose scores and probabilities [B, H, t, S] (and the absorbed form's [B, t, H, C]
# queries and latent outputs) fit, and a naive call whose per-head keys and values [B, S, H, N + V] would not fit runs
# in the absorbed form, which holds none. V3 (128 heads) prefilling a 4,096-token prompt alone held 8.6 GB of scores
# and as much in probabilities at once, more than a 16 GB GPU has beside the weights; 16 prompt chunks at a 4,096 width
# held 8.6 GB of naive keys and values. Each query's softmax is over its own row of S, so neither changes the math
# (the forms agree to rounding). Decode at any width and 16 chunk rows of 256 queries up to a 256-position width keep
# the one-block naive program; wider chunk rows split in two or more.
SCORE_BLOCK_BYTES = 1 << 30


def attention_form(form: MlaForm, B: int, S: int, H: int, N: int, V: int) -> MlaForm:
    """The form a call runs in: naive holds every position's per-head keys and values in f32 ([B, S, H, N + V],
    whatever the number of queries); past SCORE_BLOCK_BYTES of them (16 chunk rows of V3 at a 4,096 width: 8.6 GB) the
    call computes the same attention in the absorbed form."""
    if form == "naive" and B * S * H * (N + V) * 4 > SCORE_BLOCK_BYTES:
        return "absorbed"
    return form


def query_block(B: int, T: int, H: int, S: int, C: int = 0, limit: int | None = None) -> int:
    """Queries per block: T when a block's f32 scores and probabilities (B x H x S each per query) and, absorbed (C: the
    kv latent rank; 0 for naive), its queries and latent outputs (B x H x C each per query) fit `limit` (default
    SCORE_BLOCK_BYTES); else T halved while it is even and they do not."""
    limit = SCORE_BLOCK_BYTES if limit is None else limit
    per_query = _per_query_bytes(B, H, S, C)
    qb = T
    while qb % 2 == 0 and qb * per_query > limit:
        qb //= 2
    return qb


def _per_query_bytes(B: int, H: int, S: int, C: int) -> int:
    return B * H * (2 * S + 2 * C) * 4


def held_bytes(form: MlaForm, B: int, T: int, S: int, H: int, N: int, V: int, C: int) -> int:
    """f32 temporaries a call of B rows x T queries at width S holds at once, in the form and blocks it runs in: one
    query block's share (query_block) plus the naive form's per-head keys and values (what the planner charges)."""
    absorbed = attention_form(form, B, S, H, N, V) == "absorbed"
    latent = C if absorbed else 0
    return (query_block(B, T, H, S, latent) * _per_query_bytes(B, H, S, latent)
            + (0 if absorbed else B * S * H * (N + V) * 4))


def init_layer_cache(batch: int, max_len: int, cfg: ModelConfig, dtype) -> dict[str, jax.Array]:
    """Empty cache of one layer: {'c': [B, S, C], 'pe': [B, S, R]}."""
    return {"c": jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
            "pe": jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype)}


def _write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache[b, start[b]:start[b]+T] = new[b] for every row (rows may start at different positions)."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0)))(cache, new, start)


def _write_pages(cache: jax.Array, new: jax.Array, pages: jax.Array, positions: jax.Array) -> jax.Array:
    """Paged cache [P, page, ...]: position p of batch row b goes to page pages[b, p // page] at offset p % page.
    Positions past the row's page table (a padding token) or rows whose pages lie past the pool (a padding row)
    write nothing, so padding never touches a request's cache."""
    size, W = cache.shape[1], pages.shape[1]
    slot = positions // size
    page = jnp.take_along_axis(pages, jnp.clip(slot, 0, W - 1), axis=1)
    page = jnp.where((positions >= 0) & (slot < W), page, cache.shape[0])
    return cache.at[page, positions % size].set(new.astype(cache.dtype), mode="drop")


def _project_q(w, x, cfg: ModelConfig):
    B, T, _ = x.shape
    if cfg.q_lora_rank is None:
        q = ops.linear(x, w["q"])
    else:
        q = ops.linear(rms_norm(ops.linear(x, w["q_a"]), w["q_a_norm"], LATENT_NORM_EPS), w["q_b"])
    q = q.reshape(B, T, cfg.num_attention_heads, cfg.qk_head_dim)  # per head [nope | rope]
    return q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]


def attention(w: dict, x: jax.Array, cache: dict, positions: jax.Array, cfg: ModelConfig,
              form: MlaForm = "absorbed", pages: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """MLA block on normed input x [B, T, D] at absolute positions [B, T] (contiguous per row).

    Returns the attention output [B, T, D] and the cache with this chunk written. Queries see cached positions
    <= their own; the caller keeps each row's cache filled up to its current position.

    With `pages` [B, W], `cache` is a pool of pages shared by requests ({'c': [P, page, C], 'pe': [P, page, R]}):
    batch row b's positions live in pages pages[b, :W] (its page table), and it attends over those W pages (W x page
    positions, more than its real positions; the causal mask hides the rest). Padding writes nothing.
    """
    B, T, _ = x.shape
    H, N, V, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q_nope, q_pe = _project_q(w, x, cfg)                              # [B, T, H, N], [B, T, H, R]
    kv = ops.linear(x, w["kv_a"])                                     # [B, T, C + R]: latent rows, then rope rows
    c = rms_norm(kv[..., :C], w["kv_a_norm"], LATENT_NORM_EPS)        # [B, T, C]
    cos, sin = rope_cos_sin(positions, cfg)
    q_pe = apply_rope(q_pe, cos, sin)
    k_pe = apply_rope(kv[..., C:], cos, sin)                          # [B, T, R], shared by all heads

    if pages is None:
        start = positions[:, 0]
        cache = {"c": _write(cache["c"], c, start), "pe": _write(cache["pe"], k_pe, start)}
        cc, cpe = cache["c"], cache["pe"]                             # [B, S, C], [B, S, R]
    else:
        cache = {k: _write_pages(cache[k], v, pages, positions) for k, v in (("c", c), ("pe", k_pe))}
        cc, cpe = (cache[k][pages].reshape(B, -1, cache[k].shape[-1]) for k in ("c", "pe"))   # [B, W*page, C/R]
    S = cc.shape[1]
    visible = jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, T, S] causal over absolute positions

    kv_b = ops.materialize(w["kv_b"], x.dtype).reshape(H, N + V, C)  # per head [k_nope | v] rows
    w_uk, w_uv = kv_b[:, :N, :], kv_b[:, N:, :]                       # [H, N, C], [H, V, C]
    form = attention_form(form, B, S, H, N, V)
    if form == "naive":                                               # keys and values once, for every block
        k_nope = ops.einsum_f32("bsc,hnc->bshn", cc, w_uk)                                  # [B, S, H, N]
        v = ops.einsum_f32("bsc,hvc->bshv", cc, w_uv)                                       # [B, S, H, V]

    def attend(q_nope, q_pe, visible):                                # one block of queries -> [B, t, H, V]
        if form == "absorbed":
            q_abs = ops.einsum_f32("bthn,hnc->bthc", q_nope, w_uk)
            scores = (ops.einsum_f32("bthc,bsc->bhts", q_abs, cc.astype(F32))
                      + ops.einsum_f32("bthr,bsr->bhts", q_pe.astype(F32), cpe.astype(F32)))
        else:
            scores = (ops.einsum_f32("bthn,bshn->bhts", q_nope.astype(F32), k_nope)
                      + ops.einsum_f32("bthr,bsr->bhts", q_pe.astype(F32), cpe.astype(F32)))
        scores = jnp.where(visible[:, None], scores * cfg.softmax_scale, -jnp.inf)
        p = jax.nn.softmax(scores, axis=-1)                           # [B, H, t, S] float32
        if form == "absorbed":
            o_lat = ops.einsum_f32("bhts,bsc->bthc", p, cc.astype(F32))
            return ops.einsum_f32("bthc,hvc->bthv", o_lat, w_uv.astype(F32))
        return ops.einsum_f32("bhts,bshv->bthv", p, v)

    qb = query_block(B, T, H, S, C if form == "absorbed" else 0)
    if qb == T:
        o = attend(q_nope, q_pe, visible)
    else:                                                             # blocks of qb queries, one after another
        blocks = lambda a: jnp.moveaxis(a.reshape(B, T // qb, qb, *a.shape[2:]), 1, 0)    # noqa: E731
        o = jax.lax.map(lambda args: attend(*args), (blocks(q_nope), blocks(q_pe), blocks(visible)))
        o = jnp.moveaxis(o, 0, 1).reshape(B, T, H, V)
    out = ops.linear(o.astype(x.dtype).reshape(B, T, H * V), w["o"])
    return out, cache

"""The sampler's programs (runtime/sampler.py): one program with the top-k / top-p filter serves every mix of rows,
each row keeping exactly what it would get alone; log-probabilities come in one bucket, sliced per request.

Oracle: the filtered support computed in numpy (float64) from the definitions (top-k: the k most likely, ties with
the k-th kept; top-p: a token is dropped when the probability mass strictly before it reaches top_p), then
jax.random.categorical on those masked logits with the row's key; log-probabilities against numpy's log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.runtime.sampler import MAX_LOGPROBS, VARIANTS, _choose, choose, seed_key_data
from dsjax.runtime.sampling import SamplingParams

V = 64


def _logits(rows: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, V)) * 2.5).astype(np.float32)


def _oracle_mask(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Scaled logits of one row with the filtered-out tokens at -inf (float64, from the definitions)."""
    s = logits.astype(np.float64) / p.temperature
    order = np.argsort(-s, kind="stable")
    keep = np.ones(V, bool)
    if p.top_k:
        kth = s[order[p.top_k - 1]]
        keep &= s >= kth
    if p.top_p < 1.0:
        srt = np.where(keep[order], s[order], -np.inf)
        probs = np.exp(srt - srt.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        assert np.abs(before - p.top_p).min() > 1e-4, "top_p on a boundary: pick another value"
        drop = np.zeros(V, bool)
        drop[order] = before >= p.top_p
        keep &= ~drop
    return np.where(keep, s, -np.inf)


def _oracle_token(logits: np.ndarray, p: SamplingParams, seed: int, index: int) -> int:
    if p.temperature == 0.0:
        return int(np.argmax(logits))
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(seed_key_data(seed))), index)
    return int(jax.random.categorical(key, jnp.asarray(_oracle_mask(logits, p), jnp.float32)))


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
          SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=1.0, top_k=12, top_p=0.6),
          SamplingParams(), SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=0.9, top_p=0.35),
          SamplingParams(temperature=1.0)]


def test_a_mix_of_rows_gives_each_row_its_own_filtered_choice():
    lg = _logits(len(PARAMS))
    for trial in range(12):
        seeds = [1000 * trial + n for n in range(len(PARAMS))]
        index = [trial + 3 * n for n in range(len(PARAMS))]
        got = choose(jnp.asarray(lg), PARAMS, seeds, index).tokens
        want = [_oracle_token(lg[n], p, seeds[n], index[n]) for n, p in enumerate(PARAMS)]
        assert got.tolist() == want, (trial, got.tolist(), want)
        # each row alone (its own program: plain rows run without the filter) gives the same token
        for n in (0, 1, 4, 6):
            alone = choose(jnp.asarray(lg[n:n + 1]), [PARAMS[n]], [seeds[n]], [index[n]]).tokens
            assert int(alone[0]) == want[n]


def test_unfiltered_rows_in_the_filtered_program_match_the_plain_program_bit_for_bit():
    """top_k 0 and top_p 1 leave a row exactly as the plain program has it (the filter's sort and scatter back move
    values, they do not round them): 200 draws agree."""
    lg = jnp.asarray(_logits(8, seed=1))
    temp = np.full(8, 1.1, np.float32)
    for s in range(25):
        keys = np.stack([seed_key_data(s * 8 + n) for n in range(8)])
        idx = np.arange(8, dtype=np.int32) + s
        a = _choose(lg, keys, idx, temp, np.ones(8, np.float32), np.zeros(8, np.int32), np.zeros(8, bool),
                    filtered=True, logprobs=False)[0]
        b = _choose(lg, keys, idx, temp, np.ones(8, np.float32), np.zeros(8, np.int32), np.zeros(8, bool),
                    filtered=False, logprobs=False)[0]
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("n", [1, 3, MAX_LOGPROBS])
def test_logprobs_are_the_top_n_of_the_log_softmax(n):
    lg = _logits(3, seed=2)
    ch = choose(jnp.asarray(lg), [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.5), SamplingParams()],
                [1, 2, 3], [0, 0, 0], [n, 0, 1])
    ref = lg.astype(np.float64) - np.log(np.exp(lg.astype(np.float64)).sum(-1, keepdims=True))
    for r in range(3):
        order = np.argsort(-ref[r], kind="stable")[:n]
        assert ch.top_ids[r, :n].tolist() == order.tolist()
        np.testing.assert_allclose(ch.top_logprobs[r, :n], ref[r, order], atol=1e-5)
        np.testing.assert_allclose(ch.logprob[r], ref[r, ch.tokens[r]], atol=1e-5)


def test_the_variants_reach_every_program_any_request_meets():
    """Engine.warmup compiles _choose for each of VARIANTS per row count: after them, no mix of parameters and logprob
    counts makes a new program (the jit's cache stays at len(VARIANTS) entries for the shape)."""
    lg = jnp.asarray(_logits(4, seed=3))
    _choose.clear_cache()
    for params, lp in VARIANTS:
        choose(lg, [params] * 4, [0] * 4, [0] * 4, [lp] * 4)
    assert _choose._cache_size() == len(VARIANTS) == 4
    mixes = [([SamplingParams(temperature=0.5, top_k=3)] * 4, [0, 0, 0, 0]),
             ([SamplingParams(temperature=0.5, top_p=0.9), SamplingParams(), SamplingParams(temperature=1.0),
               SamplingParams(top_k=7)], [0, 5, 0, 20]),
             ([SamplingParams(temperature=1.0)] * 4, [1, 0, 0, 0]),
             ([SamplingParams(top_p=0.5, top_k=4)] * 4, [0, 0, 0, 0]),       # greedy: the filter does not apply
             ([SamplingParams(temperature=2.0, top_p=0.3, top_k=9)] * 4, [2, 3, 4, 5])]
    for params, lps in mixes:
        choose(lg, params, [1, 2, 3, 4], [0, 1, 2, 3], lps)
    assert _choose._cache_size() == 4

"""Token choice for a step's rows, each with its own sampling parameters and its own random stream.

A row's key is (its request's seed, the index of the token it is choosing), so a request's tokens depend only on its
prompt, its parameters and its seed: alone, in a batch of other prompts or joining a running batch, it draws the
same numbers. Greedy rows (temperature 0) take the argmax of the raw logits. One jitted call per step.
"""

# N rows, V vocab, L top logprobs

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.runtime.sampling import SamplingParams

MAX_LOGPROBS = 20          # top alternatives a request may ask for (OpenAI's top_logprobs bound)


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a step chose for its rows: token ids [N], and when asked, each chosen token's log-probability [N] and the
    top alternatives (ids [N, L], log-probabilities [N, L]) under the model's distribution (before temperature)."""

    tokens: np.ndarray
    logprob: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


@functools.partial(jax.jit, static_argnames=("filtered", "logprobs"))
def _choose(logits, key_data, index, temperature, top_p, top_k, greedy, *, filtered: bool, logprobs: bool):
    # logits [N, V] (or [N, 1, V]) float32; key_data [N, 2] uint32 (a threefry key per row's seed); index [N] int32.
    # Four programs per row count: with or without the top-k / top-p filter (each row applies its own, top_k 0 and
    # top_p 1 leave a row as it is: exactly, so one program serves every mix of rows), with or without the top
    # MAX_LOGPROBS log-probabilities (a request asking for fewer takes the first ones).
    logits = logits.reshape(logits.shape[0], -1)
    V = logits.shape[-1]
    keys = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k), i))(key_data, index)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if filtered:
        order = jnp.argsort(-scaled, axis=-1)                                   # [N, V] descending
        srt = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(V)[None, :]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)  # top_k 0 = off; ties with the k-th value are kept
        kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
        srt = jnp.where((rank >= k[:, None]) & (srt < kth), -jnp.inf, srt)
        probs = jax.nn.softmax(srt, axis=-1)                # mass strictly above a token >= top_p drops it
        before = jnp.cumsum(probs, axis=-1) - probs         # (always keeps the most likely token; top_p 1 = off,
        srt = jnp.where((top_p[:, None] < 1.0) & (before >= top_p[:, None]), -jnp.inf, srt)   # rounding aside)
        scaled = jnp.full_like(scaled, -jnp.inf).at[jnp.arange(scaled.shape[0])[:, None], order].set(srt)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), sampled)
    if not logprobs:
        return tokens, None, None, None
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, min(MAX_LOGPROBS, V))
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0], top_ids, top_lp


# One request of each of _choose's programs (parameters, logprobs): what Engine.warmup compiles for each row count.
VARIANTS = ((SamplingParams(), 0), (SamplingParams(temperature=1.0, top_p=0.5, top_k=2), 0),
            (SamplingParams(), 1), (SamplingParams(temperature=1.0, top_p=0.5, top_k=2), 1))


def seed_key_data(seed: int) -> np.ndarray:
    """The threefry key of a 64-bit seed as its two uint32 words (what jax.random.key(seed) holds)."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def _arguments(N: int, params: list[SamplingParams], seeds: list[int], index: list[int],
               logprobs: list[int] | None) -> tuple[tuple, dict]:
    """_choose's arguments after the logits for N rows (rows past len(params) are padding), and its static ones."""
    n = len(params)
    pad = N - n
    temp = np.array([p.temperature for p in params] + [0.0] * pad, np.float32)
    top_p = np.array([p.top_p for p in params] + [1.0] * pad, np.float32)
    top_k = np.array([p.top_k for p in params] + [0] * pad, np.int32)
    keys = np.stack([seed_key_data(s) for s in seeds] + [seed_key_data(0)] * pad)
    idx = np.asarray(list(index) + [0] * pad, np.int32)
    filtered = bool((((top_k[:n] > 0) | (top_p[:n] < 1.0)) & (temp[:n] > 0)).any())
    return (keys, idx, temp, top_p, top_k, temp == 0.0), dict(filtered=filtered, logprobs=max(logprobs or [0]) > 0)


def choose(logits: jax.Array, params: list[SamplingParams], seeds: list[int], index: list[int],
           logprobs: list[int] | None = None) -> Choice:
    """Tokens for logits [N, V]: row n follows params[n] with the key of (seeds[n], index[n]); rows past len(params)
    are padding (sampled greedily, ignored). `logprobs[n]` > 0 asks for that many top alternatives."""
    args, static = _arguments(logits.shape[0], params, seeds, index, logprobs)
    tokens, lp, top_ids, top_lp = _choose(logits, *args, **static)
    if not static["logprobs"]:
        return Choice(np.asarray(tokens))
    return Choice(np.asarray(tokens), np.asarray(lp), np.asarray(top_ids), np.asarray(top_lp))


def lower_variant(logits: jax.ShapeDtypeStruct, variant: tuple[SamplingParams, int]) -> Callable[[], Any]:
    """A thunk lowering the program `choose` runs for `variant` (one of VARIANTS) on logits of this abstract value
    (for a compile thread: compile_ahead.CompileAhead; the call later finds it compiled)."""
    params, lp = variant
    args, static = _arguments(logits.shape[0], [params], [0], [0], [lp])
    return lambda: _choose.lower(logits, *args, **static)

"""Sampling parameters and the token choice from logits: greedy, temperature, top-k, top-p.

Randomness depends only on (seed, sequence index, step), never on batch composition, preset or budget, so the same
prompt and seed give the same tokens everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (argmax); top_k 0 and top_p 1.0 disable those filters.

    Example:
        >>> SamplingParams(max_new_tokens=64, temperature=0.6, top_p=0.95, seed=1)
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()          # stop strings (text is cut before them)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = 0                # None: the engine draws a fresh random seed for the request

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        # NaN compares false with everything, so each range test below is written to fail on it.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**64), or None for a fresh random seed")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if "" in self.stop:
            raise ValueError(f"stop={list(self.stop)!r}: an empty stop string matches everywhere (generation would "
                             "stop at once); drop it, or use stop_token_ids to stop on a token")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@functools.lru_cache(maxsize=64)
def _base_key(seed: int) -> jax.Array:
    return jax.random.key(seed)


@functools.partial(jax.jit, static_argnames=("greedy", "top_k", "use_top_p"))
def _sample(logits, base, seq_ids, step, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    # logits [B, V] float32; base: the seed's PRNG key; seq_ids [B] int32; step int32
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(base, s), step))(seq_ids)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly above each token
        drop_sorted = before >= top_p                        # always keeps the most likely token
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def sample(logits: jax.Array, params: SamplingParams, seq_ids: Sequence[int], step: int) -> jax.Array:
    """Next tokens [B] for logits [B, V]; row b uses key (seed, seq_ids[b], step). One jitted call per token (the
    keys are derived inside it), so sampling costs one dispatch, not dozens of eager ops."""
    return _sample(logits, _base_key(params.seed), np.asarray(seq_ids, np.int32), np.int32(step),
                   np.float32(max(params.temperature, 1e-6)), np.float32(params.top_p),
                   greedy=params.temperature == 0.0, top_k=params.top_k, use_top_p=params.top_p < 1.0)

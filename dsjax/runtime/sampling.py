"""Sampling parameters: greedy, temperature, top-k, top-p, stop conditions and the seed of one request.

The token choice from logits lives in sampler.py: randomness depends only on (seed, token index), never on batch
composition, preset or budget, so the same prompt and seed give the same tokens everywhere.
"""

from __future__ import annotations

import dataclasses
import math

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

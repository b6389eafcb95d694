"""KVPool: MLA's compressed cache for every running request, in fixed-size pages under the GPU budget.

Per layer, one array of pages for the kv latent and one for the rope key ({'c': [P, page, C], 'pe': [P, page, R]};
attention.attention reads and writes them through each request's page table). A request is given every page it can
ever need when it is admitted (prompt + the tokens it may generate, within the context), so a running request never
runs out and nothing is preempted; when the pool has too few free pages, new requests wait. The pool's bytes are
accounted once, in the MemoryManager's compute pool, at construction.

Owned by the engine thread (allocation, the arrays themselves); nothing here is thread-safe.
"""

# P pages, C kv latent rank, R rope dim, W pages of one request

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.runtime.planner import BudgetError, fmt_bytes

PAGE_TOKENS = 64           # positions per page: a V3 page is 64 x 576 values x 61 layers = 4.5 MB in bf16


def kv_bytes_per_token(cfg: ModelConfig, dtype) -> int:
    """Bytes one token's compressed cache takes over all layers."""
    return cfg.num_hidden_layers * cfg.kv_cache_dim * np.dtype(dtype).itemsize


class KVPool:
    """Example:
        >>> pool = KVPool(cfg, pages=256, dtype=jnp.bfloat16, sharding=dev)
        >>> table = pool.alloc(n_tokens=300)      # page ids, or None while the pool is too full
        >>> pool.free(table)
    """

    def __init__(self, cfg: ModelConfig, pages: int, dtype, sharding, *, mm=None, pool: str = "compute",
                 page_tokens: int = PAGE_TOKENS):
        if pages < 1:
            raise BudgetError(f"the KV pool has room for no page of {page_tokens} tokens; raise gpu_memory or "
                              "lower max_context")
        self.cfg = cfg
        self.page_tokens = page_tokens
        self.pages = pages
        self.dtype = np.dtype(dtype)
        self.nbytes = pages * page_tokens * kv_bytes_per_token(cfg, dtype)
        self._mm = mm
        if mm is not None:
            mm.reserve(pool, "kv_pool", self.nbytes)
        zeros = jax.jit(lambda: [{"c": jnp.zeros((pages, page_tokens, cfg.kv_lora_rank), self.dtype),
                                  "pe": jnp.zeros((pages, page_tokens, cfg.qk_rope_head_dim), self.dtype)}
                                 for _ in range(cfg.num_hidden_layers)], out_shardings=sharding)
        self._zeros = zeros
        self.caches: list[dict] = zeros()
        self._free = list(range(pages - 1, -1, -1))      # a stack: the lowest page ids are handed out first

    @property
    def capacity_tokens(self) -> int:
        return self.pages * self.page_tokens

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.page_tokens)

    def alloc(self, n_tokens: int) -> list[int] | None:
        """Pages for `n_tokens` positions, or None when fewer are free (the caller waits; nothing is taken)."""
        n = self.pages_for(n_tokens)
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def reset(self) -> None:
        """Fresh arrays (after a failed step consumed the donated ones); every page free."""
        self.caches = self._zeros()
        self._free = list(range(self.pages - 1, -1, -1))

    def broken(self) -> bool:
        """True when a failed call consumed (donated) the arrays."""
        return any(a.is_deleted() for a in jax.tree.leaves(self.caches))

    def report(self) -> dict[str, int]:
        return {"pages": self.pages, "page_tokens": self.page_tokens, "pages_used": self.pages - len(self._free),
                "tokens": self.capacity_tokens, "bytes": self.nbytes}

    def describe(self) -> str:
        return (f"KV pool: {self.pages} pages of {self.page_tokens} tokens ({self.capacity_tokens} tokens, "
                f"{fmt_bytes(self.nbytes)})")

"""Readiness: the server's warm-up as a state the routes read, so `dsjax serve` listens while it compiles.

On a GPU a warm-up of prompts up to 512 tokens, outputs up to 128 and batch buckets up to 32 (59 step shapes) took
631 s on an H100 with a cold compile cache (bench/RESULTS.md, run 10): a server that only starts listening afterwards
is a closed port for ten minutes, with no sign of life a load balancer or a user can read. So
the server listens at once: GET /health answers 503 with the warm-up's progress until it ends (then 200), the
completion routes answer 503 with Retry-After (a request would wait behind the whole warm-up: it runs as one call on
the engine thread), and /v1/models and /metrics answer throughout.

Threads: `progress` runs on the engine thread (Engine.warmup's callback, after each step shape); the warm-up thread
of dsjax.serve.cli calls `finish`; the event loop reads `ready` and `report()`; `cancel` comes from the main thread
at shutdown. Plain attribute writes under a lock; the engine thread never waits on anything else here.

Example:
    >>> r = Readiness()
    >>> app = create_app(engine, readiness=r)          # /health: 503 {"status": "warming_up", ...}
    >>> engine.warmup(512, 128, progress=r.progress)    # on another thread; then
    >>> r.finish()                                      # /health: 200
"""

from __future__ import annotations

import threading
import time
from typing import Any


class WarmupCancelled(Exception):
    """Raised on the engine thread by Readiness.progress once the server is shutting down: the warm-up stops after
    the step shape it was compiling (Engine.warmup closes its compile threads on the way out)."""


class Readiness:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.done = 0
        self.total: int | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self.error: str | None = None

    @property
    def ready(self) -> bool:
        return self.ended is not None

    def progress(self, done: int, total: int) -> None:
        """Engine.warmup's progress callback (engine thread): step shapes compiled of all."""
        with self._lock:
            self.done, self.total = done, total
        if self._cancel.is_set():
            raise WarmupCancelled("the server is shutting down")

    def finish(self, error: str | None = None) -> None:
        """The warm-up ended (`error`: why it stopped early; the server then compiles on first use)."""
        with self._lock:
            self.error, self.ended = error, time.monotonic()

    def cancel(self) -> None:
        """Stop the warm-up at its next step shape (shutdown)."""
        self._cancel.set()

    def report(self) -> dict[str, Any]:
        with self._lock:
            end = self.ended if self.ended is not None else time.monotonic()
            return {"ready": self.ended is not None, "step_shapes_done": self.done, "step_shapes": self.total,
                    "seconds": round(end - self.started, 1), "error": self.error}

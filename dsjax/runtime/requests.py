"""Requests and what callers hold of them: a Request (prompt ids, its own sampling parameters and seed) lives on the
engine thread; a RequestHandle is the caller's side (token events, the final Generation, cancel), safe from any thread.

The engine thread owns every Request field; callers touch only the handle, whose queue and flags are thread-safe.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Iterator

from dsjax.runtime.sampling import SamplingParams
from dsjax.runtime.tokenizer import StreamDecoder


class PromptError(ValueError):
    """A prompt the engine cannot run (empty, too long for the context, ids outside the vocabulary, wrong type)."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token of sequence `seq`: its id, the text it completes (may be empty) and whether it ends.
    `finish_reason`: "stop", "length" or "cancelled" on the last event. With logprobs asked for: the token's
    log-probability and the top alternatives [(token id, log-probability)]."""

    seq: int
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclasses.dataclass
class Generation:
    """A finished sequence: prompt ids, generated ids, generated text, why it stopped ("stop", "length" or
    "cancelled"), the seed it sampled with, and per token (logprob, top alternatives) when asked for."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    seed: int = 0
    logprobs: list[tuple[float, tuple[tuple[int, float], ...]]] | None = None


_DONE = object()


class RequestHandle:
    """The caller's side of a submitted request. Thread-safe.

    Example:
        >>> h = engine.submit("Thou art", max_new_tokens=8, seed=1)
        >>> for ev in h.events(): print(ev.text, end="")
        >>> h.result().finish_reason
    """

    def __init__(self, request_id: str, prompt_ids: list[int], seed: int, seq: int = 0,
                 on_event: Callable[[TokenEvent], None] | None = None):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.seed = seed
        self.seq = seq
        self.submitted = time.perf_counter()
        self.first_token: float | None = None       # perf_counter of the first token, and of the last
        self.last_token: float | None = None
        self._on_event = on_event
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._tokens: list[int] = []
        self._texts: list[str] = []
        self._logprobs: list = []
        self._reason: str | None = None
        self._error: BaseException | None = None

    # ---- caller side ---------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to drop this request; its rows and KV are freed at the next step (finish_reason
        "cancelled"). No effect once finished."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Token events as they come; raises the error that failed the request, TimeoutError after `timeout` s
        without an event. Consumes the event queue: iterate once."""
        while True:
            try:
                ev = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id}: no token for {timeout} s") from None
            if ev is _DONE:
                if self._error is not None:
                    raise self._error
                return
            yield ev

    def result(self, timeout: float | None = None) -> Generation:
        """The finished Generation (waits for it); raises the error that failed the request."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return Generation(self.prompt_ids, list(self._tokens), "".join(self._texts), self._reason or "length",
                          self.seed, list(self._logprobs) if self._logprobs else None)

    # ---- engine side ---------------------------------------------------------------------------------------------
    def _emit(self, ev: TokenEvent) -> None:
        now = time.perf_counter()
        if ev.token_id >= 0:
            self._tokens.append(ev.token_id)
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
            if ev.logprob is not None:
                self._logprobs.append((ev.logprob, ev.top_logprobs or ()))
        self._texts.append(ev.text)
        if ev.finished:
            self._reason = ev.finish_reason
        self._queue.put(ev)
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:       # a caller's callback must not break the engine thread
                pass
        if ev.finished:
            self._finish()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        if self._on_event is not None:
            try:
                self._on_event(TokenEvent(self.seq, -1, "", True, "error"))
            except Exception:
                pass
        self._finish()

    def _finish(self) -> None:
        self._queue.put(_DONE)
        self._done.set()


@dataclasses.dataclass(eq=False)
class Request:
    """A request as the engine thread holds it. `pos` is the number of tokens in its KV cache; a request prefills its
    prompt (pos < len(prompt)) and then decodes one token per step."""

    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    seed: int
    budget: int                          # tokens it may still generate: min(max_new_tokens, context - prompt)
    stop_ids: frozenset[int]
    logprobs: int = 0
    decoder: StreamDecoder | None = None
    pages: list[int] | None = None       # its KV pool pages while running (its page table)
    pos: int = 0                         # tokens written to its KV cache
    generated: list[int] = dataclasses.field(default_factory=list)
    emitted: int = 0                     # characters of the decoded text already sent

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt)

    @property
    def last_token(self) -> int:
        return self.generated[-1]

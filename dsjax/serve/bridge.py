"""Between the HTTP routes and the engine: admission (model name, prompt, queue bound), submission, and the tokens
of each request read back on the event loop, through the stop-string and reasoning filters.

Thread model: uvicorn runs these handlers on one asyncio event loop; the engine runs every request on its own engine
thread (dsjax/runtime/engine.py). A handler validates and tokenizes on the loop, `engine.submit`s one engine request
per choice, and reads the tokens back through an asyncio queue that the engine thread feeds with
`loop.call_soon_threadsafe` (its `on_event` callback must never block). Nothing here touches device arrays, so no
client can corrupt the engine: the worst a request can do is be refused (400/404/429) or cancelled (its rows and KV
are freed at the engine's next step).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from typing import Any, AsyncIterator

import numpy as np
from starlette.requests import Request

from dsjax.runtime.tokenizer import StreamDecoder

from dsjax.serve import protocol as P
from dsjax.serve.metrics import ServerMetrics
from dsjax.serve.text import ReasoningSplitter, StopFilter

POLL_S = 0.5        # how often a request waiting for tokens checks its client and its deadline


class _Disconnected(Exception):
    pass


class Choice:
    """One engine request of an HTTP request (one prompt x one of n): its handle and the filters its text passes."""

    def __init__(self, index: int, prompt_ids: list[int], stops: list[str], thinking: bool | None,
                 top_logprobs: int | None):
        self.index, self.prompt_ids = index, prompt_ids
        self.handle = None
        self.stop = StopFilter(stops)
        # thinking None: no reasoning split (completions); False / True: chat, the output starts outside / inside
        self.splitter = None if thinking is None else ReasoningSplitter(thinking)
        self.top_logprobs = top_logprobs                 # None: no logprobs asked for
        self.token_ids: list[int] = []
        self.text: list[str] = []                        # content as emitted
        self.reasoning: list[str] = []
        self.logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] = []
        self.finish_reason: str | None = None
        self.t_last: float | None = None
        self.pending = False                             # counted in Server.pending (no token yet)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def advance(self, ev) -> dict[str, Any]:
        """Feed one TokenEvent; returns this token's piece: text / reasoning to emit, the token, its logprobs."""
        text, stopped = self.stop.push(ev.text or "")
        reason = "stop" if stopped else ev.finish_reason if ev.finished else None
        if reason and not stopped:
            text += self.stop.flush()
        reasoning = ""
        if self.splitter is not None:
            reasoning, text = self.splitter.push(text)
            if reason:
                r, c = self.splitter.flush()
                reasoning, text = reasoning + r, text + c
        if ev.token_id < 0:                              # an end without a token (cancelled, error): text only
            if self.text:
                self.text[-1] += text
                self.reasoning[-1] += reasoning
            elif text or reasoning:
                self.text.append(text)
                self.reasoning.append(reasoning)
            self.finish_reason = reason
            return {"text": text, "reasoning": reasoning, "token_id": None, "logprob": None, "finish_reason": reason}
        self.token_ids.append(ev.token_id)
        self.text.append(text)
        self.reasoning.append(reasoning)
        lp = None
        if self.top_logprobs is not None:
            lp = (ev.token_id, ev.logprob, list(ev.top_logprobs or ())[: self.top_logprobs])
            self.logprobs.append(lp)
        self.finish_reason = reason
        if stopped and not ev.finished and self.handle is not None:
            self.handle.cancel()                         # the stop string ended it before the engine saw it
        return {"text": text, "reasoning": reasoning, "token_id": ev.token_id, "logprob": lp, "finish_reason": reason}


class Server:
    """State shared by the routes: the engine, the served name, limits, metrics."""

    def __init__(self, engine, served_model_name: str, api_key: str | None, max_queue: int,
                 request_timeout: float | None):
        self.engine = engine
        self.model = served_model_name
        self.api_key = api_key
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.metrics = ServerMetrics()
        self.created = P.now()
        self.tok = engine.tokenizer
        self.pending = 0                 # submitted choices without a first token yet (see admit)

    # ---- admission -------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model:
            raise P.ApiError(404, f"model {name!r} does not exist; this server serves {self.model!r}", param="model",
                             code="model_not_found")

    def admit(self, k: int) -> None:
        """429 when k more requests would leave more than max_queue of them not yet generating.

        Counted here, not from engine.requests_status(): the engine publishes its waiting count once per step, so a
        burst of arrivals inside one step would all pass a check against it. A request counts from its submission
        to its first token (waiting for KV pages or batch room, or in prefill), which includes every request the
        engine has waiting."""
        if self.pending + k > self.max_queue:
            st = self.engine.requests_status()
            raise P.ApiError(429, f"the server is at capacity: {self.pending} requests waiting for their first token "
                                  f"(--max-queue {self.max_queue}), {st.get('running', 0)} running; retry later",
                             code="queue_full", headers={"Retry-After": "1"})

    def encode(self, prompt, *, chat: bool, param: str) -> list[int]:
        try:
            ids = self.engine.encode(prompt, chat=chat)
        except Exception as e:                            # TokenizerError, PromptError, a chat template that fails
            raise P.ApiError(400, f"{param}: {e}", param=param) from None
        if not ids:
            raise P.ApiError(400, f"{param}: the prompt is empty", param=param)
        vocab = self.engine.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise P.ApiError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
        if len(ids) >= self.engine.max_context:
            raise P.ApiError(400, f"{param}: the prompt has {len(ids)} tokens; this model's context is "
                                  f"{self.engine.max_context} tokens (prompt + at least one generated token)",
                             param=param, code="context_length_exceeded")
        return ids

    def max_new_tokens(self, n_prompt: int, asked: int | None, default: int | None, param: str) -> int:
        room = self.engine.max_context - n_prompt
        if asked is not None and asked > room:
            raise P.ApiError(400, f"{param}: the prompt ({n_prompt} tokens) + {param} ({asked}) exceed this model's "
                                  f"context of {self.engine.max_context} tokens", param=param,
                             code="context_length_exceeded")
        return asked if asked is not None else min(default or room, room)

    @functools.lru_cache(maxsize=65536)
    def token_str(self, token_id: int) -> str:
        """A token's text for logprobs; `token_id:N` where it has none of its own (no tokenizer, or a byte-level
        token that is part of a UTF-8 character: several such would collide as U+FFFD in top_logprobs' keys)."""
        text = self.tok.decode([token_id], skip_special_tokens=False) if self.tok else "\ufffd"
        return f"token_id:{token_id}" if "\ufffd" in text else text

    async def prompt_logprobs(self, ids: list[int], top: int) -> tuple[list, list[str]]:
        """Each prompt token's (id, logprob given the tokens before it, top-n alternatives) and its text, from one full
        forward (`engine.logits`, run between the engine's steps); the first token has no logprob."""
        def run():
            x = np.asarray(self.engine.logits(ids))[0, :-1].astype(np.float32)       # [T-1, V]
            m = x.max(-1, keepdims=True)
            x -= m + np.log(np.exp(x - m).sum(-1, keepdims=True))                   # log-softmax in place
            out = [(ids[0], None, [])]
            k = max(top, 1)
            for t in range(1, len(ids)):
                row = x[t - 1]
                best = np.argpartition(-row, k - 1)[:k]
                best = best[np.argsort(-row[best], kind="stable")]
                out.append((ids[t], float(row[ids[t]]), [(int(b), float(row[b])) for b in best[:top]]))
            texts = []
            if self.tok is not None:
                dec = StreamDecoder(self.tok)
                texts = [dec.push(t) for t in ids]
                texts[-1] += dec.flush()
            return out, texts or [""] * len(ids)
        try:
            return await asyncio.to_thread(run)
        except ValueError as e:
            raise P.ApiError(400, f"prompt: {e}", param="prompt") from None

    # ---- running ---------------------------------------------------------------------------------------------
    def submit(self, choices: list[Choice], params: list, logprobs: int) -> asyncio.Queue:
        """Submit every choice; one queue gets (choice index, TokenEvent) from the engine thread."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def feeder(i: int):
            def on_event(ev):                             # engine thread: must not block
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
                except RuntimeError:                      # the loop is closed: the server is shutting down
                    pass
            return on_event

        rid = P.new_id("req")
        try:
            for c, p in zip(choices, params):
                c.handle = self.engine.submit(c.prompt_ids, p, logprobs=logprobs, on_event=feeder(c.index),
                                              request_id=f"{rid}-{c.index}")
        except ValueError as e:
            self.cancel(choices)
            raise P.ApiError(400, str(e), param=P.param_of(str(e))) from None
        except Exception as e:
            self.cancel(choices)
            raise P.ApiError(503, f"the engine cannot take requests: {type(e).__name__}: {e}") from None
        self.metrics.prompt_tokens += sum(len(c.prompt_ids) for c in choices)
        for c in choices:
            c.pending = True
        self.pending += len(choices)
        return queue

    @staticmethod
    def cancel(choices: list[Choice]) -> None:
        for c in choices:
            if c.handle is not None and not c.finished:
                c.handle.cancel()

    async def pieces(self, request: Request, choices: list[Choice], queue: asyncio.Queue,
                     t0: float) -> AsyncIterator[tuple[Choice, dict[str, Any]]]:
        """The tokens of all choices as they come: (choice, piece). Raises ApiError on a step error (500) or the
        deadline (504), _Disconnected when the client went away; the caller cancels what is left."""
        by_index = {c.index: c for c in choices}
        deadline = t0 + self.request_timeout if self.request_timeout else math.inf
        while not all(c.finished for c in choices):
            try:
                i, ev = await asyncio.wait_for(queue.get(), timeout=min(POLL_S, max(deadline - time.monotonic(), 0)))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise P.ApiError(504, f"the request timed out after {self.request_timeout:g} s "
                                          "(--request-timeout)", code="timeout")
                if await request.is_disconnected():
                    raise _Disconnected()
                continue
            c = by_index[i]
            if c.finished:                                # an event after our stop-string cut or cancel: dropped
                continue
            if ev.finish_reason == "error":
                raise P.ApiError(500, f"the engine failed while generating: {self._error_of(c)}", code="engine_error")
            now = time.monotonic()
            self._first_token(c)
            if ev.token_id >= 0:
                if c.t_last is None:
                    self.metrics.ttft.observe(now - t0)
                else:
                    self.metrics.itl.observe(now - c.t_last)
                c.t_last = now
            piece = c.advance(ev)
            if c.finished:
                self.metrics.finished(c.finish_reason, len(c.token_ids), now - t0)
            yield c, piece

    def _first_token(self, c: Choice) -> None:
        if c.pending:
            c.pending = False
            self.pending -= 1

    @staticmethod
    def _error_of(c: Choice) -> str:
        try:
            c.handle.result(timeout=5)                   # raises the step's error (set just before this event)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "unknown error"

    def end(self, choices: list[Choice], reason: str, t0: float) -> None:
        """Count and cancel the choices a disconnect, timeout or error ended."""
        self.cancel(choices)
        for c in choices:
            self._first_token(c)
            if not c.finished:
                self.metrics.finished(reason, len(c.token_ids), time.monotonic() - t0)
                c.finish_reason = reason

"""The OpenAI-compatible HTTP API of an engine: `create_app(engine, ...)` -> a FastAPI app.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics (Prometheus text).
Streaming answers are Server-Sent Events, one `data:` chunk per generated token (the chat stream's first chunk carries
the role), then a usage chunk with `choices: []` when `stream_options.include_usage`, then `data: [DONE]`. Errors
use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 bad field (param names it), 401 wrong API key,
404 unknown model, 429 queue full (with Retry-After), 500 a failed engine step, 503 warming up (with Retry-After;
GET /health answers 503 with the warm-up's progress until it ends: dsjax.serve.readiness), 504 the request timeout;
an error after a stream began is sent as one `data: {"error": ...}` event before `[DONE]`.

Example:
    >>> app = create_app(dsjax.load(store), served_model_name="demo", max_queue=64)
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsjax.serve import protocol as P
from dsjax.serve.bridge import Choice, Server, _Disconnected
from dsjax.serve.readiness import Readiness
from dsjax.serve.text import prompt_opens_thought

COMPLETIONS_DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions (chat: up to the context)
WARMING_UP_RETRY = {"Retry-After": "10"}  # seconds a client should wait before asking again during the warm-up


def create_app(engine, *, served_model_name: str | None = None, api_key: str | None = None, max_queue: int = 64,
               request_timeout: float | None = None, readiness: Readiness | None = None) -> FastAPI:
    """An OpenAI-compatible app over `engine` (the request-level engine of dsjax.runtime).

    `served_model_name`: the only name `model` may take (default: the engine's name); `api_key`: required as
    `Authorization: Bearer KEY` on /v1/* when set; `max_queue`: requests that may wait for a free KV row beyond those
    running before new ones get 429; `request_timeout`: seconds from arrival to the last token (None: no limit);
    `readiness`: the warm-up under way (None: ready at once), until whose end /health and the completion routes
    answer 503.
    """
    srv = Server(engine, served_model_name or getattr(engine, "name", "") or "dsjax", api_key, max_queue,
                 request_timeout)
    app = FastAPI(title="dsjax", summary="OpenAI-compatible API of a dsjax engine", docs_url=None, redoc_url=None)
    app.state.server = srv

    def error_response(e: P.ApiError) -> JSONResponse:
        srv.metrics.http[e.status] += 1
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(P.ApiError)
    async def _api_error(request: Request, e: P.ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(P.ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                         code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(P.ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))

    async def auth(request: Request) -> None:
        if srv.api_key is not None and request.headers.get("authorization") != f"Bearer {srv.api_key}":
            raise P.ApiError(401, "incorrect or missing API key: send `Authorization: Bearer KEY`",
                             code="invalid_api_key")

    def ok(body: dict[str, Any]) -> JSONResponse:
        srv.metrics.http[200] += 1
        return JSONResponse(body)

    def check_ready() -> None:
        if readiness is not None and not readiness.ready:
            r = readiness.report()
            of = f"{r['step_shapes_done']}/{r['step_shapes']}" if r["step_shapes"] else "0"
            raise P.ApiError(503, f"the server is warming up ({of} step shapes compiled in {r['seconds']:.0f} s): "
                             "retry later; GET /health answers 200 once it is ready", code="warming_up",
                             headers=WARMING_UP_RETRY)

    @app.get("/health")
    async def health():
        if readiness is not None and not readiness.ready:
            srv.metrics.http[503] += 1
            return JSONResponse({"status": "warming_up", "model": srv.model, "warmup": readiness.report()},
                                status_code=503, headers=WARMING_UP_RETRY)
        return ok({"status": "ok", "model": srv.model,
                   **({"warmup": readiness.report()} if readiness is not None else {})})

    @app.get("/metrics")
    async def metrics():
        from dsjax.runtime.metrics import prometheus_text
        status = engine.requests_status()
        try:                                     # stats() reads the engine's counters; off the event loop
            stats = await asyncio.to_thread(engine.stats)
            engine_text = prometheus_text(stats)
        except Exception as e:                   # the runtime's figures are a bonus; never fail the scrape on them
            stats, engine_text = {}, f"# engine.stats() failed: {type(e).__name__}: {e}\n"
        steps = stats.get("steps") if isinstance(stats.get("steps"), dict) else None
        warmup = readiness.report() if readiness is not None else None
        return PlainTextResponse(srv.metrics.prometheus(status, steps, engine_text, warmup),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return ok({"object": "list", "data": [{"id": srv.model, "object": "model", "created": srv.created,
                                               "owned_by": "dsjax", "max_model_len": engine.max_context,
                                               "vocab_size": engine.config.vocab_size}]})

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        t0 = time.monotonic()
        check_ready()
        body = P.parse(P.CompletionRequest, await request.body())
        srv.check_model(body.model)
        if body.max_tokens == 0 and not body.echo:
            raise P.ApiError(400, "max_tokens: must be >= 1 (0 only with echo: score the prompt, generate nothing)",
                             param="max_tokens")
        prompts = body.prompts()
        ids_of = [srv.encode(prompt, chat=False, param="prompt") for prompt in prompts]
        # echo: the prompt comes back before the completion; with logprobs, its tokens' logprobs too (lm-eval's
        # loglikelihood requests: echo, logprobs=1, max_tokens 0 or 1), from one full forward of each prompt
        echo = {i: _prompt_text(srv, p, ids) if body.echo else "" for i, (p, ids) in enumerate(zip(prompts, ids_of))}
        echo_lps = {}
        if body.echo and body.logprobs is not None:
            for i, ids in enumerate(ids_of):
                echo_lps[i] = await srv.prompt_logprobs(ids, body.logprobs)
        choices, params = [], []
        for i, ids in enumerate(ids_of):
            max_new = 0 if body.max_tokens == 0 else \
                srv.max_new_tokens(len(ids), body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "max_tokens")
            for j in range(body.n):
                c = Choice(i * body.n + j, ids, body.stop, None, body.logprobs)
                if max_new:
                    choices.append(c)
                    params.append(_sampling(body, max_new, j))
                else:
                    c.finish_reason = "length"
                    choices.append(c)
        generating = [c for c in choices if not c.finished]
        srv.admit(len(generating))
        queue = srv.submit(generating, params, logprobs=_engine_logprobs(body.logprobs))
        echo = {c.index: echo[c.index // body.n] for c in choices}
        echo_lps = {c.index: echo_lps.get(c.index // body.n, ([], [])) for c in choices}
        rid, created = P.new_id("cmpl"), P.now()
        head = {"id": rid, "object": "text_completion", "created": created, "model": srv.model}

        if body.stream:
            offsets = {c.index: len(echo[c.index]) for c in choices}

            def first_chunks():
                out = []
                for c in choices:
                    if body.echo:
                        lps, texts = echo_lps[c.index]
                        lp = _completion_logprobs(srv, lps, texts, 0) if body.logprobs is not None else None
                        out.append(dict(head, choices=[{"index": c.index, "text": echo[c.index], "logprobs": lp,
                                                        "finish_reason": c.finish_reason}]))
                return out

            def chunk(c: Choice, piece: dict[str, Any]) -> dict[str, Any]:
                ch = {"index": c.index, "text": piece["text"], "logprobs": None,
                      "finish_reason": piece["finish_reason"]}
                if piece["logprob"] is not None:
                    ch["logprobs"] = _completion_logprobs(srv, [piece["logprob"]], [piece["text"]], offsets[c.index])
                offsets[c.index] += len(piece["text"])
                if body.return_token_ids:
                    ch["token_ids"] = [] if piece["token_id"] is None else [piece["token_id"]]
                return dict(head, choices=[ch])

            return _stream(srv, request, body, choices, queue, t0, head, first_chunks, chunk)

        await _collect(srv, request, choices, queue, t0)
        out = []
        for c in choices:
            text = echo[c.index] + "".join(c.text)
            ch = {"index": c.index, "text": text, "logprobs": None, "finish_reason": c.finish_reason}
            if c.top_logprobs is not None:
                lps, texts = echo_lps[c.index]
                ch["logprobs"] = _completion_logprobs(srv, lps + c.logprobs, texts + c.text, 0) if body.echo else \
                    _completion_logprobs(srv, c.logprobs, c.text, 0)
            if body.return_token_ids:
                ch["token_ids"] = c.token_ids
            out.append(ch)
        return ok(dict(head, choices=out, usage=_usage(body.n, choices)))

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(request: Request):
        t0 = time.monotonic()
        check_ready()
        body = P.parse(P.ChatRequest, await request.body())
        srv.check_model(body.model)
        ids = srv.encode(body.chat_messages(), chat=True, param="messages")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = srv.max_new_tokens(len(ids), asked, None, name)
        thinking = srv.tok is not None and prompt_opens_thought(srv.tok.decode(ids[-8:], skip_special_tokens=False))
        top = (body.top_logprobs or 0) if body.logprobs else None
        choices = [Choice(j, ids, body.stop, thinking, top) for j in range(body.n)]
        params = [_sampling(body, max_new, j) for j in range(body.n)]
        srv.admit(len(choices))
        queue = srv.submit(choices, params, logprobs=_engine_logprobs(top))
        head = {"id": P.new_id("chatcmpl"), "object": "chat.completion.chunk" if body.stream else "chat.completion",
                "created": P.now(), "model": srv.model}

        if body.stream:
            def first_chunks():
                return [dict(head, choices=[{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]) for c in choices]

            def chunk(c: Choice, piece: dict[str, Any]) -> dict[str, Any]:
                delta = {"content": piece["text"]}
                if piece["reasoning"]:
                    delta = {"reasoning_content": piece["reasoning"], **({"content": piece["text"]}
                                                                        if piece["text"] else {})}
                ch = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": piece["finish_reason"]}
                if piece["logprob"] is not None:
                    ch["logprobs"] = {"content": [_chat_logprob(srv, piece["logprob"])]}
                if body.return_token_ids:
                    ch["token_ids"] = [] if piece["token_id"] is None else [piece["token_id"]]
                return dict(head, choices=[ch])

            return _stream(srv, request, body, choices, queue, t0, head, first_chunks, chunk)

        await _collect(srv, request, choices, queue, t0)
        out = []
        for c in choices:
            msg = {"role": "assistant", "content": "".join(c.text)}
            reasoning = "".join(c.reasoning)
            if reasoning:
                msg["reasoning_content"] = reasoning
            ch = {"index": c.index, "message": msg, "logprobs": None, "finish_reason": c.finish_reason}
            if c.top_logprobs is not None:
                ch["logprobs"] = {"content": [_chat_logprob(srv, lp) for lp in c.logprobs]}
            if body.return_token_ids:
                ch["token_ids"] = c.token_ids
            out.append(ch)
        return ok(dict(head, choices=out, usage=P.usage(len(ids), sum(len(c.token_ids) for c in choices))))

    return app


# ---- helpers shared by the two generation routes -----------------------------------------------------------------
def _sampling(body, max_new: int, j: int):
    """Choice j's SamplingParams: n > 1 choices use seeds seed, seed + 1, ... (each fresh when seed is None); any
    integer seed is taken modulo 2**64 (the engine's seeds are unsigned 64-bit; OpenAI's may be negative)."""
    from dsjax.runtime.sampling import SamplingParams
    try:
        return SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), stop=tuple(body.stop),
                              stop_token_ids=tuple(body.stop_token_ids or ()),
                              seed=None if body.seed is None else (body.seed + j) % 2**64)
    except ValueError as e:
        raise P.ApiError(400, str(e), param=P.param_of(str(e))) from None


def _engine_logprobs(top: int | None) -> int:
    # the engine reports the sampled token's logprob with its top-n; n >= 1 whenever logprobs were asked for at all
    return 0 if top is None else max(top, 1)


def _prompt_text(srv: Server, prompt, ids: list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    return srv.tok.decode(ids) if srv.tok is not None else ""


def _usage(n: int, choices: list[Choice]) -> dict[str, int]:
    # a prompt counts once however many choices it has (OpenAI's accounting)
    return P.usage(sum(len(c.prompt_ids) for c in choices if c.index % n == 0), sum(len(c.token_ids) for c in choices))


def _completion_logprobs(srv: Server, lps: list, texts: list[str], offset: int) -> dict[str, Any]:
    """lm-eval's local-completions format: tokens, token_logprobs, top_logprobs (dicts), text_offset. A prompt's
    first token has no logprob (null, as OpenAI's echo gives)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for (tid, lp, top), text in zip(lps, texts):
        tok = srv.token_str(tid)
        out["tokens"].append(tok)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if lp is None else {srv.token_str(t): l for t, l in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _chat_logprob(srv: Server, entry) -> dict[str, Any]:
    tid, lp, top = entry

    def one(t, l):
        s = srv.token_str(t)
        return {"token": s, "logprob": l, "bytes": list(s.encode())}

    return dict(one(tid, lp), top_logprobs=[one(t, l) for t, l in top])


async def _collect(srv: Server, request: Request, choices: list[Choice], queue, t0: float) -> None:
    """Run the choices to their end; a disconnect, timeout or engine error cancels what is left."""
    try:
        async for _ in srv.pieces(request, choices, queue, t0):
            pass
    except _Disconnected:
        srv.end(choices, "cancelled", t0)
        raise P.ApiError(499, "the client disconnected", code="client_closed") from None
    except P.ApiError as e:
        srv.end(choices, "timeout" if e.status == 504 else "error", t0)
        raise
    except BaseException:                    # CancelledError: the server is shutting down
        srv.end(choices, "cancelled", t0)
        raise


def _stream(srv: Server, request: Request, body, choices: list[Choice], queue, t0: float, head: dict,
            first_chunks, chunk) -> StreamingResponse:
    usage_null = {"usage": None} if body.include_usage else {}

    async def events():
        try:
            for c in first_chunks():
                yield P.sse({**c, **usage_null})
            async for c, piece in srv.pieces(request, choices, queue, t0):
                yield P.sse({**chunk(c, piece), **usage_null})
            if body.include_usage:
                yield P.sse(dict(head, choices=[], usage=_usage(body.n, choices)))
            yield P.DONE
        except _Disconnected:
            srv.end(choices, "cancelled", t0)
        except P.ApiError as e:
            srv.end(choices, "timeout" if e.status == 504 else "error", t0)
            srv.metrics.http[e.status] += 1
            yield P.sse(e.body())
            yield P.DONE
        finally:                             # client gone (the response task was cancelled) or the stream ended
            srv.end(choices, "cancelled", t0)

    srv.metrics.http[200] += 1
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def default_model_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))

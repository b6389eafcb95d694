"""`dsjax serve`: load a store and serve it over OpenAI's HTTP API (argparse front-end; the server is dsjax.serve.app).

Importing this module needs nothing beyond argparse, so `dsjax --help` works without the `serve` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from dsjax.serve.app import create_app
        from dsjax.serve.readiness import Readiness
    except ImportError as e:
        print(f"dsjax: error: `dsjax serve` needs FastAPI, uvicorn and pydantic ({e.name} is missing): "
              "pip install 'dsjax[serve]'", file=sys.stderr)
        return 2
    if args.warmup_tokens < 1 and args.warmup_prompt != 0:     # before loading anything
        print(f"dsjax: error: --warmup-tokens {args.warmup_tokens} must be >= 1 (or --warmup-prompt 0: no warm-up)",
              file=sys.stderr)
        return 2
    if args.warmup_bursts < 1:
        print(f"dsjax: error: --warmup-bursts {args.warmup_bursts} must be >= 1 (1: a prompt alone)", file=sys.stderr)
        return 2
    if args.warmup_threads is not None and args.warmup_threads < 0:
        print(f"dsjax: error: --warmup-threads {args.warmup_threads} must be >= 0 (0: every program on the engine "
              "thread)", file=sys.stderr)
        return 2
    import jax

    import dsjax
    from dsjax.cli import _check_budgets_with_devices, _follower, parse_overrides, start_devices
    devices = start_devices(args)
    if not _follower():          # before the load: a taken port is known in a second, not after minutes of loading
        _check_listen(args.host, args.port)
    _check_budgets_with_devices(args, devices)
    path, dtype = args.path, args.dtype
    if path is None:                                  # a fresh install serves the embedded model, as `dsjax demo`
        from dsjax.demo import ensure_demo_store
        path, dtype = ensure_demo_store(), dtype or "float32"
    runtime = {k: v for k, v in (("preset", args.preset), ("gpu_memory", args.gpu_memory),
                                 ("host_memory", args.host_memory), ("devices", devices)) if v is not None}
    runtime.update(parse_overrides(args.set))
    engine = dsjax.load(path, dtype=dtype or "bfloat16", progress=True, **runtime)
    if _follower():         # another process of a run over several: process 0 serves, this one runs its steps
        print(f"[dsjax serve] process {jax.process_index()} follows process 0's steps", file=sys.stderr, flush=True)
        engine.follow()
        return 0
    warm = args.warmup_prompt
    if warm is None:                                  # auto: on an accelerator (compiles there take seconds each)
        warm = 0 if jax.default_backend() == "cpu" else 512
    if warm > 0 and jax.process_count() > 1:
        print("[dsjax serve] no warm-up over several processes (not built): programs compile on first use",
              file=sys.stderr, flush=True)
        warm = 0
    # The server listens during the warm-up (minutes on a GPU with a cold compile cache): /health answers 503 with
    # its progress, the completion routes 503 with Retry-After, until it ends
    readiness = Readiness() if warm > 0 else None
    name = args.served_model_name or os.path.basename(os.path.normpath(path))
    app = create_app(engine, served_model_name=name, api_key=args.api_key or os.environ.get("DSJAX_API_KEY") or None,
                     max_queue=args.max_queue, request_timeout=args.request_timeout or None, readiness=readiness)
    warming = None
    if readiness is not None:
        warming = threading.Thread(target=_warmup_in_background, name="dsjax-serve-warmup", daemon=True,
                                   args=(engine, readiness, warm, args.warmup_tokens, args.warmup_bursts,
                                         args.warmup_threads))
        warming.start()
    print(f"[dsjax serve] {name} (context {engine.max_context} tokens) at http://{args.host}:{args.port}/v1 "
          f"(/health, /metrics{'; /health answers 503 until the warm-up ends' if warming else ''}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        if warming is not None:
            readiness.cancel()                      # the warm-up stops after the step shape under way
            warming.join()
        engine.close()
    return 0


def _check_listen(host: str, port: int) -> None:
    """A ValueError naming the fix when the server could not listen on host:port: a port out of range, a host that
    does not resolve, or an address another process holds (bound once here and released; uvicorn binds it again)."""
    import socket
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} must lie in 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} does not resolve ({e.strerror}); give an address such as 127.0.0.1 "
                         "(this machine only) or 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)       # as uvicorn binds it
        try:
            sock.bind(address)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): another process holds that port, or "
                             "the address is not this machine's; stop the other server or choose --port / --host") from None


def _warmup_in_background(engine, readiness, max_prompt: int, max_new_tokens: int, bursts: int,
                          threads: int | None) -> None:
    """The warm-up thread of `dsjax serve`: Engine.warmup (one call on the engine thread), its progress into
    `readiness`, then the server ready; a warm-up that fails leaves the server ready all the same (what it did not
    compile compiles on first use) with the error in /health's report, and one cancelled at shutdown just ends."""
    from dsjax.serve.readiness import WarmupCancelled
    try:
        _warmup(engine, max_prompt, max_new_tokens, bursts, threads, on_progress=readiness.progress)
    except WarmupCancelled:
        readiness.finish("cancelled: the server is shutting down")
    except Exception as e:                          # noqa: BLE001 - reported, and the server serves on
        msg = f"{type(e).__name__}: {e}"
        print(f"[dsjax serve] warm-up failed ({msg}); programs compile on first use", file=sys.stderr, flush=True)
        readiness.finish(msg)
    else:
        readiness.finish()


def _warmup(engine, max_prompt: int, max_new_tokens: int, bursts: int = 1, threads: int | None = None,
            on_progress=None) -> None:
    """Compile the step shapes of requests up to these lengths (Engine.warmup), printing its progress; `on_progress`
    (done, total) is called after each step shape too (on the engine thread; what it raises stops the warm-up)."""
    import time
    t0, last = time.perf_counter(), [0.0]

    def progress(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(done, total)
        if time.perf_counter() - last[0] > 10 or done == total:
            last[0] = time.perf_counter()
            spent = last[0] - t0
            # shapes differ in cost (a prompt's are larger than a decode step's): the rate so far is a rough guide
            left = f", ~{spent / done * (total - done):.0f} s left at this rate" if done < total else ""
            print(f"[dsjax serve] warm-up: {done}/{total} step shapes compiled ({spent:.0f} s{left})", file=sys.stderr,
                  flush=True)
    r = engine.warmup(max_prompt=max_prompt, max_new_tokens=max_new_tokens, progress=progress, bursts=bursts,
                      compile_threads=threads)
    on_pool = (f" ({r['compile_threads']['programs']} of them on {r['threads']} compile threads)"
               if r["threads"] else "")
    print(f"[dsjax serve] warm-up done: prompts up to {min(max_prompt, engine.max_context)} tokens, outputs up to "
          f"{max_new_tokens}{f', up to {bursts} prompts arriving at once' if bursts > 1 else ''}: {r['steps']} step "
          f"shapes, {r['programs']} programs{on_pool}, {r['seconds']:.1f} s compiling, {r['wall_s']:.1f} s in all "
          "(longer requests and larger bursts compile on first use)",
          file=sys.stderr, flush=True)


def add_parser(subparsers) -> None:
    """Add the `serve` subcommand to the dsjax CLI's subparsers."""
    s = subparsers.add_parser(
        "serve", help="serve a store over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible server (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health, "
                    "/metrics) with continuous batching on the engine's thread, streaming, a bounded queue (429 past "
                    "--max-queue) and Prometheus metrics. Needs the `serve` extra: pip install 'dsjax[serve]'.")
    s.add_argument("path", nargs="?", default=None, help="dsjax store (or Hugging Face checkpoint) directory; default: "
                   "the embedded model's store, converted on first use as `dsjax demo` does")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--preset", default=None, help="runtime preset: low_latency, high_throughput, balanced, or a YAML "
                   "file")
    s.add_argument("--gpu-memory", default=None, help="GPU budget, e.g. 16GB (default: the preset's, or no limit)")
    s.add_argument("--host-memory", default=None, help="pinned host budget, e.g. 96GB")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any memory_config / compute_config key, e.g. --set max_batch_size=64 (repeatable)")
    s.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="compute dtype (default bfloat16; float32 for the embedded model)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* (default: the "
                   "DSJAX_API_KEY environment variable; none = open)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a free KV row before new "
                   "ones get 429 with Retry-After (default 64)")
    s.add_argument("--request-timeout", type=float, default=None, help="seconds from arrival to the last token before "
                   "a request is cancelled with 504 (default: no limit)")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: the store "
                   "directory's name)")
    s.add_argument("--warmup-prompt", type=int, default=None, metavar="N",
                   help="before serving requests, compile the step shapes of prompts up to N tokens (0: none; "
                   "default 512 on a GPU, 0 on the CPU backend): a compile mid-run stalls every running request. "
                   "The server listens meanwhile: /health answers 503 with the progress, then 200")
    s.add_argument("--warmup-tokens", type=int, default=256, metavar="N",
                   help="... and of outputs up to N tokens (default 256)")
    s.add_argument("--warmup-bursts", type=int, default=1, metavar="N",
                   help="... and of up to N prompts arriving at once at an idle server, prefilled in one step (default "
                   "1: a prompt alone; each count bucket up to N adds a shape per prompt bucket to the warm-up)")
    s.add_argument("--warmup-threads", type=int, default=None, metavar="N",
                   help="threads compiling the warm-up's attention programs beside the engine thread (0: none; "
                   "default: one per CPU but one, at most 8, on the CPU backend; 0 on a GPU, where side-by-side "
                   "compiles may disturb XLA's kernel autotuning: not measured yet)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    from dsjax.cli import add_device_args
    add_device_args(s)
    s.set_defaults(fn=cmd_serve)

"""`dsjax serve`: an OpenAI-compatible HTTP server over the request-level engine (FastAPI + uvicorn).

protocol.py  OpenAI's request models, error body and SSE framing
text.py      stop strings and the R1 `<think>` split over streamed text
bridge.py    admission (model, prompt, queue bound), submission, tokens from the engine thread to the event loop
metrics.py   the server's Prometheus figures (TTFT / inter-token histograms, tokens, outcomes)
app.py       the routes: create_app(engine, ...)
cli.py       the `dsjax serve` subcommand

fastapi, uvicorn and pydantic are the optional extra `dsjax[serve]`: `create_app` needs them, `dsjax --help` and the
rest of dsjax do not (hence the lazy import).
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from dsjax.serve.app import create_app
        return create_app
    raise AttributeError(f"module 'dsjax.serve' has no attribute {name!r}")

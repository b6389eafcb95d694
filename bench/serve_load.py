"""Load generator for an OpenAI-compatible server (`dsjax serve`, or any other): Poisson arrivals, N concurrent
streams, prompt and output lengths drawn from ranges; reports aggregate tok/s, time to first token and inter-token
latency (p50/p90/p99) per concurrency level, as JSON.

Every request streams (`stream: true`, `stream_options.include_usage`), so each token's arrival time is seen: TTFT is
send -> first token chunk, inter-token latency the gaps between token chunks of one request (dsjax sends one chunk
per token). Throughput: output tok/s over the whole level, and "busy" output tok/s from the start until the first
stream runs out of requests (no ramp-down tail: the figure to hold against `dsjax bench`'s static batch of the same
size). Prompts are token ids by default (/v1/completions accepts them), so stores without a tokenizer work and
lengths are exact; `--text` sends words instead.

Example (a server on the embedded model: `dsjax serve --port 8000`):
    python bench/serve_load.py --url http://127.0.0.1:8000 --concurrency 1,8 --prompt-len 8:32 --output-len 8:16 \\
        --out /tmp/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time

try:
    import httpx
except ImportError:                 # newer environments ship the client as httpx2 (same API)
    import httpx2 as httpx


@dataclasses.dataclass
class Result:
    ok: bool
    status: int
    prompt_tokens: int
    output_tokens: int = 0
    t_send: float = 0.0
    ttft: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    t_tokens: list[float] = dataclasses.field(default_factory=list)     # arrival time of each token chunk
    e2e: float | None = None
    error: str | None = None


def parse_range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{s!r}: write N or LO:HI with 1 <= LO <= HI")
    return lo, hi


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(xs)

    def q(p):                        # nearest-rank on the sorted sample, linear between ranks
        k = (len(s) - 1) * p
        f, c = math.floor(k), math.ceil(k)
        return s[f] + (s[c] - s[f]) * (k - f)
    return {"mean": sum(s) / len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


WORDS = ("the of and to in is was that for on with as by at from his her they be this which or had not but are "
         "were an have one their all she there been has would when who will more no if out so said what up its").split()


def make_prompt(rng: random.Random, n: int, args) -> str | list[int]:
    if args.text:
        return " ".join(rng.choice(WORDS) for _ in range(n))
    return [rng.randrange(args.min_token_id, args.max_token_id) for _ in range(n)]


async def one_request(client, args, model: str, prompt, prompt_len: int, max_tokens: int, seed: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": args.temperature,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    res = Result(ok=False, status=0, prompt_tokens=prompt_len, t_send=time.perf_counter())
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:300]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message")
                    return res
                now = time.perf_counter()
                if chunk.get("choices"):
                    res.t_tokens.append(now)
                    if last is None:
                        res.ttft = now - res.t_send
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
        res.ok = res.ttft is not None
        res.e2e = (last or time.perf_counter()) - res.t_send
    except (httpx.HTTPError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def engine_compiles(client) -> tuple[float, float] | None:
    """(programs, seconds) the dsjax engine thread has lowered/compiled so far (its /metrics), None elsewhere."""
    try:
        r = await client.get("/metrics")
        vals = {ln.split()[0]: float(ln.split()[1]) for ln in r.text.splitlines()
                if ln.startswith("dsjax_steps_compiles_") and len(ln.split()) == 2}
        return vals["dsjax_steps_compiles_programs"], vals["dsjax_steps_compiles_seconds"]
    except (httpx.HTTPError, OSError, KeyError, ValueError, IndexError):
        return None


async def run_level(args, model: str, concurrency: int, n_requests: int, rng: random.Random) -> dict:
    """n_requests arriving as a Poisson process at args.rate (inf: all at once), at most `concurrency` in flight."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    specs = []
    for i in range(n_requests):
        p = rng.randint(*args.prompt_len)
        specs.append((make_prompt(rng, p, args), p, rng.randint(*args.output_len), args.seed + i))
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout, connect=30)) as client:
        async def gated(spec):
            async with sem:
                return await one_request(client, args, model, *spec)

        if args.warmup:             # compile this concurrency's batch shapes before measuring
            await asyncio.gather(*(gated((make_prompt(rng, args.prompt_len[0], args), args.prompt_len[0], 4, 0))
                                   for _ in range(concurrency)))
        c0 = await engine_compiles(client)
        t0 = time.perf_counter()
        tasks = []
        for spec in specs:
            tasks.append(asyncio.create_task(gated(spec)))
            if math.isfinite(args.rate):
                await asyncio.sleep(rng.expovariate(args.rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        c1 = await engine_compiles(client)
    # the engine thread's compiles during the level: every running stream waits while one runs
    compiles = {"programs": c1[0] - c0[0], "seconds": c1[1] - c0[1]} if (c0 and c1) else None
    done = [r for r in results if r.ok]
    # While every stream is busy: from the start until the first stream goes idle for good (the first request to
    # finish after the last one was sent). Without the ramp-down tail this compares with a static batch of that size.
    last_send = max(r.t_send for r in results)
    ends = [r.t_send + r.e2e for r in done if r.t_send + r.e2e >= last_send]
    busy_end = min(ends) if ends else None
    busy = None
    if busy_end is not None and busy_end > t0:
        n = sum(1 for r in done for t in r.t_tokens if t <= busy_end)
        busy = {"seconds": busy_end - t0, "output_tokens": n, "output_tok_s": n / (busy_end - t0)}
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "concurrency": concurrency, "requests": n_requests, "completed": len(done), "failed": n_requests - len(done),
        "statuses": statuses, "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration, "output_tokens": out_tokens, "prompt_tokens": in_tokens,
        "output_tok_s": out_tokens / duration, "total_tok_s": (out_tokens + in_tokens) / duration,
        "requests_per_s": len(done) / duration, "all_streams_busy": busy, "engine_compiles": compiles,
        "ttft_s": percentiles([r.ttft for r in done]),
        "itl_s": percentiles([x for r in done for x in r.itl]),
        "e2e_s": percentiles([r.e2e for r in done]),
        "tpot_s": percentiles([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]),
    }


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


async def main_async(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=30) as c:
        r = await c.get("/v1/models")
        r.raise_for_status()
        card = r.json()["data"][0]
        model = args.model or card["id"]
        if "vocab_size" in card:    # dsjax's /v1/models says it: keep token-id prompts inside the vocabulary
            args.max_token_id = min(args.max_token_id, card["vocab_size"])
    rng = random.Random(args.seed)
    levels = []
    print(f"# {args.url} model {model}: prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs "
          f"{args.output_len[0]}-{args.output_len[1]}, rate {args.rate}/s", file=sys.stderr)
    print("| streams | requests | ok | output tok/s | busy output tok/s | TTFT p50 / p90 / p99 ms | "
          "ITL p50 / p90 / p99 ms | engine compiles (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for c in args.concurrency:
        lv = await run_level(args, model, c, args.num_requests or args.requests_per_stream * c, rng)
        levels.append(lv)
        t, i = lv["ttft_s"], lv["itl_s"]
        busy = f"{lv['all_streams_busy']['output_tok_s']:.1f}" if lv["all_streams_busy"] else "-"
        print(f"| {c} | {lv['requests']} | {lv['completed']} | {lv['output_tok_s']:.1f} | {busy} | "
              f"{fmt_ms(t['p50'])} / {fmt_ms(t['p90'])} / {fmt_ms(t['p99'])} | "
              f"{fmt_ms(i['p50'])} / {fmt_ms(i['p90'])} / {fmt_ms(i['p99'])} | "
              + (f"{lv['engine_compiles']['programs']:.0f} ({lv['engine_compiles']['seconds']:.1f}) |"
                 if lv["engine_compiles"] else "- |"), flush=True)
    return {"url": args.url, "model": model, "command": " ".join(sys.argv),
            "config": {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()
                       if k != "api_key"}, "levels": levels}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    ap.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64],
                    help="streams in flight, one level after another (default 1,8,32,64)")
    ap.add_argument("--rate", type=float, default=math.inf, help="Poisson arrival rate, requests/s (default inf: "
                    "every request arrives at once and waits for a stream)")
    ap.add_argument("--num-requests", type=int, default=None, help="requests per level (default: "
                    "--requests-per-stream x concurrency)")
    ap.add_argument("--requests-per-stream", type=int, default=3)
    ap.add_argument("--prompt-len", type=parse_range, default=(32, 512), help="prompt tokens, N or LO:HI uniform "
                    "(default 32:512)")
    ap.add_argument("--output-len", type=parse_range, default=(16, 256), help="max_tokens, N or LO:HI uniform "
                    "(default 16:256; a request may stop earlier at its end-of-sequence token)")
    ap.add_argument("--text", action="store_true", help="send text prompts (words; lengths are then in words)")
    ap.add_argument("--min-token-id", type=int, default=10, help="token-id prompts draw from [min, max) (default "
                    "10:1000, capped at the vocab_size dsjax's /v1/models reports)")
    ap.add_argument("--max-token-id", type=int, default=1000)
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the lengths, prompts and request seeds")
    ap.add_argument("--warmup", type=int, default=1, help="1: before each level, one short request per stream "
                    "(compiles that batch size); 0: none")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a request may take (default 1800)")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    result = asyncio.run(main_async(args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0 if all(lv["failed"] == 0 for lv in result["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())

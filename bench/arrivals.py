"""Requests arriving over time against the static batch: the request-level engine's continuous batching (issue 19).

One engine, one process: (1) the static batch row as `dsjax bench` measures it (B prompts of P tokens together,
warm-up, then decode tok/s of a T-token generation); (2) each prompt length's prefill alone (one request, one token);
(3) N requests with Poisson arrivals (prompt and output lengths uniform in the given ranges) submitted from a client
thread at their arrival times, after Engine.warmup for their lengths (--warmup trace: a pass over the same trace), so
the run measures steps, not compiles (the engine thread's compiles during it are reported). Reports aggregate output tok/s over the whole run and over the steady window (from the last
arrival to the first finish: every request in), TTFT of each request against its own prefill time alone plus two
decode steps of the static batch, one request joining a running batch of B-1 (the same bound), and bytes per step per link from the engine's counters.
After the arrivals, static decode at batch 1 and 8 times a step by batch size, from which the occupancy reference
follows: what an engine that prefilled for free would make of the same trace (every request decoding from its
arrival, one token a step, a step of n rows taking the measured time, interpolated): how much of the gap to the static
batch is the trace's (the batch shrinks as short requests end) and how much the engine's (prefill, scheduling).

    python bench/arrivals.py STORE --gpu-memory 16GB --host-memory 96GB --requests 32 --rate 8 \\
        --prompt-len 32:512 --output-len 16:256 --out arrivals.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _trace(n: int, rate: float, prompt: tuple[int, int], output: tuple[int, int], vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate, n)) if rate > 0 else np.zeros(n)
    t -= t[0]
    lens = rng.integers(prompt[0], prompt[1] + 1, n)
    outs = rng.integers(output[0], output[1] + 1, n)
    return [(float(t[i]), rng.integers(2, vocab, int(lens[i])).tolist(), int(outs[i])) for i in range(n)]


def occupancy_reference(trace, step_s) -> tuple[int, float]:
    """(tokens, seconds) of an engine that prefills for free on `trace` ([(arrival s, prompt, output tokens)]): a request
    decodes from the first step that starts at or after its arrival, one token a step, and a step of n rows takes
    step_s(n) seconds; seconds run from the first arrival to the last token."""
    arrivals = sorted((a, out) for a, _, out in trace)
    t, i, active, made = arrivals[0][0], 0, [], 0
    while i < len(arrivals) or active:
        while i < len(arrivals) and arrivals[i][0] <= t:
            active.append(arrivals[i][1])
            i += 1
        if not active:                        # idle until the next arrival
            t = arrivals[i][0]
            continue
        t += step_s(len(active))
        made += len(active)
        active = [left - 1 for left in active if left > 1]
    return made, t - arrivals[0][0]


def static_row(engine, prompts, tokens: int) -> dict:
    """Decode of `prompts` together as `dsjax bench` measures it: a 2-token generation first, then `tokens`."""
    engine.generate(prompts, max_new_tokens=2, stop_token_ids=())
    s0 = engine.stats()
    engine.generate(prompts, max_new_tokens=tokens, stop_token_ids=())
    s1 = engine.stats()
    g = s1.get("generation", s1)
    return dict(batch=len(prompts), prompt=len(prompts[0]), tokens=tokens, decode_tok_s=g["decode_tok_s"],
                step_ms=1e3 * g["decode_s"] / (tokens - 1),
                h2d_MB_per_token_with_prefill=(s1["links"].get("host->GPU", {}).get("bytes", 0)
                                               - s0["links"].get("host->GPU", {}).get("bytes", 0)) / tokens / 1e6)


def run_trace(engine, trace, cap: int | None = None):
    """Submit each request at its arrival time; returns per-request records (submit, first, last token times)."""
    handles = []
    t0 = time.perf_counter()
    for at, prompt, out in trace:
        wait = t0 + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        handles.append((engine.submit(prompt, max_new_tokens=min(out, cap) if cap else out, stop_token_ids=()),
                        len(prompt)))
    recs = []
    for h, plen in handles:
        g = h.result()
        recs.append(dict(prompt_len=plen, tokens=len(g.token_ids), submit=h.submitted - t0,
                         first=h.first_token - t0, last=h.last_token - t0))
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--gpu-memory")
    ap.add_argument("--host-memory")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=8.0, help="arrivals per second (Poisson)")
    ap.add_argument("--prompt-len", default="32:512")
    ap.add_argument("--output-len", default="16:256")
    ap.add_argument("--static-batch", type=int, default=32)
    ap.add_argument("--static-prompt", type=int, default=32)
    ap.add_argument("--static-tokens", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], help="runtime option KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", choices=["engine", "trace"], default="engine",
                    help="before the measured arrivals: engine = Engine.warmup for the trace's lengths (what "
                    "`dsjax serve` does); trace = a pass over the same trace with outputs capped at 16")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import dsjax
    from dsjax.cli import parse_overrides
    kw = {k: v for k, v in (("gpu_memory", args.gpu_memory), ("host_memory", args.host_memory)) if v}
    kw.update(parse_overrides(args.set))
    kw.setdefault("max_batch_size", max(32, args.static_batch))
    t = time.perf_counter()
    engine = dsjax.load(args.store, dtype=args.dtype, **kw)
    log = lambda msg: print(f"[arrivals {time.perf_counter() - t:6.1f}s] {msg}", file=sys.stderr, flush=True)
    log(f"loaded; {engine.kv.describe()}, max_context {engine.max_context}")
    vocab = engine.config.vocab_size
    span = lambda s: tuple(int(v) for v in s.split(":"))
    rng = np.random.default_rng(args.seed)

    # (1) the static batch, as dsjax bench measures it
    B, P, T = args.static_batch, args.static_prompt, args.static_tokens
    prompts = [rng.integers(2, vocab, P).tolist() for _ in range(B)]
    static = static_row(engine, prompts, T)
    log(f"static batch {B}: {static['decode_tok_s']:.1f} tok/s, {static['step_ms']:.1f} ms/step")

    # (2) prefill alone per prompt length (the TTFT a request would see with nothing else running)
    lo, hi = span(args.prompt_len)
    alone = {}
    for n in sorted({lo, (lo + hi) // 2, hi}):
        p = rng.integers(2, vocab, n).tolist()
        engine.generate(p, max_new_tokens=1, stop_token_ids=())              # compile
        t0 = time.perf_counter()
        engine.generate(p, max_new_tokens=1, stop_token_ids=())
        alone[n] = time.perf_counter() - t0
    prefill_alone = lambda n: float(np.interp(n, sorted(alone), [alone[k] for k in sorted(alone)]))
    log(f"prefill alone: {', '.join(f'{k}: {1e3 * v:.0f} ms' for k, v in alone.items())}")

    # (3) one request joining a running batch (the issue's TTFT bar): B-1 prompts decode, and after their 4th, 10th
    # and 16th token a prompt of each length joins; its TTFT against its prefill alone + 2 static decode steps
    joins = []
    for rnd in range(2):                # round 0 compiles the mixed shapes, round 1 is measured
        running = [engine.submit(p, max_new_tokens=24, stop_token_ids=()) for p in prompts[:B - 1]]
        it = running[0].events()
        made = 0
        for n, at in zip(sorted(alone), (4, 10, 16)):
            while made < at:
                next(it)
                made += 1
            h = engine.submit(rng.integers(2, vocab, n).tolist(), max_new_tokens=2, stop_token_ids=())
            h.result()
            if rnd:
                joins.append(dict(prompt_len=n, ttft_s=h.first_token - h.submitted,
                                  bound_s=alone[n] + 2 * static["step_ms"] / 1e3))
        for r in running:
            r.result()
    log("joins: " + ", ".join(f"{j['prompt_len']}: {1e3 * j['ttft_s']:.0f} ms (bound {1e3 * j['bound_s']:.0f})"
                              for j in joins))

    # (4) arrivals: warm-up pass (outputs capped), then the measured pass
    trace = _trace(args.requests, args.rate, (lo, hi), span(args.output_len), vocab, args.seed + 1)
    t0 = time.perf_counter()
    if args.warmup == "trace":
        run_trace(engine, trace, cap=16)    # the same trace compiles (nearly) every shape the measured one meets
    else:                                   # every step shape of requests up to these lengths
        w = engine.warmup(max_prompt=hi, max_new_tokens=span(args.output_len)[1])
        log(f"warm-up: {w['steps']} step shapes, {w['programs']} programs, {w['seconds']:.1f} s compiling")
    log(f"warm-up ({args.warmup}) done in {time.perf_counter() - t0:.1f} s")
    c0 = engine.stats()["steps"]["compiles"]
    b0 = engine.stats()
    recs = run_trace(engine, trace)
    b1 = engine.stats()
    c1 = b1["steps"]["compiles"]
    log(f"engine-thread compiles during the arrivals: {c1['programs'] - c0['programs']} programs, "
        f"{c1['seconds'] - c0['seconds']:.1f} s")
    # (5) a step's time by batch size (shapes the warm-up compiled), and what the trace allows an engine that
    # prefilled for free
    steps_ms = {B: static["step_ms"]}
    for b in sorted({1, 8} - {B}):
        more = [rng.integers(2, vocab, P).tolist() for _ in range(b - B)]     # past the static batch's prompts
        steps_ms[b] = static_row(engine, (prompts + more)[:b], T)["step_ms"]
    log("decode step by batch: " + ", ".join(f"b{b} {ms:.1f} ms" for b, ms in sorted(steps_ms.items())))
    rows = sorted(steps_ms)
    made, wall = occupancy_reference(trace, lambda n: float(np.interp(n, rows, [steps_ms[b] for b in rows])) / 1e3)
    total = sum(r["tokens"] for r in recs)
    start, end = min(r["submit"] for r in recs), max(r["last"] for r in recs)
    last_arrival, first_finish = max(r["submit"] for r in recs), min(r["last"] for r in recs)
    steady = None
    if first_finish > last_arrival:
        # tokens made in [last arrival, first finish]: every request is in; rates assumed even within each request
        made = sum(r["tokens"] * max(0.0, min(first_finish, r["last"]) - max(last_arrival, r["first"]))
                   / max(r["last"] - r["first"], 1e-9) for r in recs)
        steady = made / (first_finish - last_arrival)
    ttft = [dict(prompt_len=r["prompt_len"], ttft_s=r["first"] - r["submit"],
                 bound_s=prefill_alone(r["prompt_len"]) + 2 * static["step_ms"] / 1e3) for r in recs]
    steps = b1["steps"]["steps"] - b0["steps"]["steps"]
    h2d = b1["links"].get("host->GPU", {}).get("bytes", 0) - b0["links"].get("host->GPU", {}).get("bytes", 0)
    result = dict(
        machine=dict(device=str(__import__("jax").devices()[0]), host=os.uname().nodename),
        static=static, prefill_alone_s=alone,
        arrivals=dict(requests=args.requests, rate=args.rate, prompt_len=args.prompt_len, output_len=args.output_len,
                      tokens=total, wall_s=end - start, tok_s=total / (end - start),
                      steady_tok_s=steady, steady_window_s=(first_finish - last_arrival) if steady else 0.0,
                      vs_static=total / (end - start) / static["decode_tok_s"],
                      steady_vs_static=(steady / static["decode_tok_s"]) if steady else None,
                      steps=steps, h2d_MB_per_step=h2d / max(steps, 1) / 1e6,
                      max_running=b1["steps"]["max_running"], warmup=args.warmup,
                      engine_compiles={k: c1[k] - c0[k] for k in c1}),
        step_ms_by_batch=steps_ms,
        occupancy_reference=dict(tokens=made, wall_s=wall, tok_s=made / wall,
                                 vs_static=made / wall / static["decode_tok_s"],
                                 measured_vs_reference=total / (end - start) / (made / wall)),
        ttft=dict(p50_s=float(np.median([x["ttft_s"] for x in ttft])),
                  max_ratio=max(x["ttft_s"] / x["bound_s"] for x in ttft),
                  within_bound=sum(x["ttft_s"] <= x["bound_s"] for x in ttft), of=len(ttft), per_request=ttft),
        join_running_batch=joins,
        command=" ".join(sys.argv))
    a = result["arrivals"]
    print(f"| static b{B} decode tok/s | arrivals tok/s (whole run) | steady window tok/s | vs static | "
          f"TTFT p50 | TTFT within prefill + 2 steps | joining b{B - 1}: TTFT / bound | free prefill's tok/s "
          f"(vs static; arrivals vs it) |")
    print(f"| {static['decode_tok_s']:.1f} | {a['tok_s']:.1f} | "
          f"{(a['steady_tok_s'] or 0):.1f} ({a['steady_window_s']:.1f} s) | {a['vs_static']:.2f} / "
          f"{(a['steady_vs_static'] or 0):.2f} | {result['ttft']['p50_s'] * 1e3:.0f} ms | "
          f"{result['ttft']['within_bound']}/{result['ttft']['of']} (max {result['ttft']['max_ratio']:.2f}x) | "
          + ", ".join(f"{j['prompt_len']}: {j['ttft_s']:.2f}/{j['bound_s']:.2f} s" for j in joins) + " | "
          f"{made / wall:.1f} ({result['occupancy_reference']['vs_static']:.2f}x; "
          f"{result['occupancy_reference']['measured_vs_reference']:.2f}x) |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

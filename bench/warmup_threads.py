"""The warm-up's compile pool on a store: Engine.warmup with N compile threads, each N in a fresh process with the
persistent compilation cache off, then decode tok/s at batch 1 (side-by-side compiles may disturb XLA's GPU
autotuning and keep slower kernels: the decode figure shows it).

    python bench/warmup_threads.py STORE [--gpu-memory 16GB --host-memory 96GB] [--threads 0,8]
        [--max-prompt 128 --max-new 32 --max-batch 8] [--out warmup_threads.json]

Prints one row per thread count: wall seconds of the warm-up, programs (engine thread / compile threads), compile
seconds summed over threads, decode tok/s (prompt 32, 16 tokens, after the warm-up; nothing compiles in it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def one(args) -> dict:
    sys.path.insert(0, os.path.join(HERE, ".."))
    import numpy as np

    import dsjax
    kw = {k: v for k, v in (("gpu_memory", args.gpu_memory), ("host_memory", args.host_memory)) if v}
    e = dsjax.load(args.store, dtype="bfloat16", max_batch_size=args.max_batch, **kw)
    r = e.warmup(max_prompt=args.max_prompt, max_new_tokens=args.max_new, compile_threads=args.one)
    prompt = np.random.default_rng(0).integers(100, min(20000, e.config.vocab_size), 32).tolist()
    e.generate([prompt], max_new_tokens=4, stop_token_ids=())
    t0 = time.perf_counter()
    out = e.generate([prompt], max_new_tokens=17, stop_token_ids=())
    wall = time.perf_counter() - t0
    s = e.stats()
    tok_s = s.get("generation", s)["decode_tok_s"]          # the tiered engine nests it
    e.close()
    return {"threads": args.one, "warmup": r, "decode_tok_s": tok_s,
            "generate_s": wall, "tokens": out[0].token_ids}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--host-memory", default=None)
    ap.add_argument("--threads", default="0,8")
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return 0
    rows = []
    for t in (int(x) for x in args.threads.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), args.store, "--one", str(t), "--max-prompt",
               str(args.max_prompt), "--max-new", str(args.max_new), "--max-batch", str(args.max_batch)]
        cmd += [x for k, v in (("--gpu-memory", args.gpu_memory), ("--host-memory", args.host_memory)) if v
                for x in (k, v)]
        env = dict(os.environ, DSJAX_COMPILE_CACHE="off")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        got = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not got:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(got[0][7:]))
        print(f"threads {t}: {rows[-1]['warmup']}", file=sys.stderr, flush=True)
    same = all(r["tokens"] == rows[0]["tokens"] for r in rows)
    print("| compile threads | warm-up wall s | programs (engine thread / compile threads) | compile s summed | "
          "engine waited s | decode tok/s b1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        w = r["warmup"]
        print(f"| {r['threads']} | {w['wall_s']:.1f} | {w['programs']} ({w['engine_thread']['programs']} / "
              f"{w['compile_threads']['programs']}) | {w['seconds']:.1f} | {w['compile_threads']['waited_s']:.1f} | "
              f"{r['decode_tok_s']:.2f} |")
    print(f"same tokens in every row: {same}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the FP4 kernels on DeepSeek-V3 shapes against XLA on bf16 weights and the jnp reference.

Run on the GPU machine:  PYTHONPATH=<dir with dsjax_kernels>:. python3 bench/kernel_bench.py [--quick] [--out F.json]
Measures the HBM ceiling (device-to-device copy, bytes read + written) and bf16 XLA matmul peak in the same run.
Every timing rotates among enough weight copies to exceed the 60 MB L2 (one launch per copy inside one jitted
call). The reported time of an op is its GPU time: the durations of the GPU kernels a profiler trace records
during the calls (the op's own kernel and its XLA helpers: padding, the even/odd split of x, the split-K sum),
divided by the number of ops run; Python dispatch and launch gaps are not in it, for the kernel and the baselines
alike. Without a GPU trace (CPU) the wall time per op is reported instead. GB/s counts packed + scale bytes read.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.runtime.bench import gpu_events, is_kernel
from dsjax_kernels.fp4_matmul import Fp4MatmulConfig, default_config, fp4_matmul, fp4_matmul_reference
from dsjax_kernels.fp4_matmul.kernel import GEMV_MAX_M
from dsjax_kernels.moe_gmm import MoeGmmConfig, default_config as default_grouped, expert_swiglu, expert_swiglu_reference, moe_gmm, moe_gmm_reference

L2_ROTATE_BYTES = 256 << 20
BS = {"nvfp4": 16, "mxfp4": 32}


def timeit(fn, *args, reps=15, warmup=2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def on_device(e: dict) -> bool:
    """A GPU event that is the op's own work: kernels, memsets (zeroed buffers, e.g. split-K counters) and copies
    within the GPU; host <-> GPU copies are not (none run inside the timed calls)."""
    return is_kernel(e) or not any(t in e["name"] for t in ("H2D", "D2H", "HtoD", "DtoH"))


def gpu_time(op, args: tuple, ws, reps: int = 10) -> tuple[float, float, dict[str, float]]:
    """(GPU seconds per op, GPU kernels per op, {event name: GPU seconds per op}) from a profiler trace of `reps`
    jitted calls, each running op(*args, *w) once per weight copy w in ws (so the weights rotate past L2). The time
    sums the op's kernels, memsets and on-GPU copies (on_device); the count is of kernels. Without GPU events in the
    trace (CPU): (wall time per op, 0, {})."""
    f = jax.jit(lambda args, ws: [op(*args, *w) for w in ws])
    wall = timeit(f, args, ws, reps=reps)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(reps):
                jax.block_until_ready(f(args, ws))
        evs = [e for e in gpu_events(d) if on_device(e)]
    ops = reps * len(ws)
    if not evs:
        return wall / len(ws), 0.0, {}
    parts = collections.defaultdict(float)
    for e in evs:
        parts[e["name"][:40]] += e["dur"] * 1e-6 / ops
    return sum(e["dur"] for e in evs) * 1e-6 / ops, sum(map(is_kernel, evs)) / ops, dict(parts)


def per_launch(op, x, ws, reps: int = 10) -> tuple[float, float]:
    """gpu_time of op(x, *w): (GPU seconds per op, GPU kernels per op)."""
    t, nk, _ = gpu_time(op, (x,), ws, reps)
    return t, nk


def fastest(label: str, configs, make_op, x, ws) -> tuple[float, object, float]:
    """(GPU seconds, config, kernels per op) of the fastest of `configs` (make_op(config) -> op); a config the
    compiler rejects is reported and skipped, not fatal."""
    best = None
    for cfg in configs:
        try:
            t, nk, parts = gpu_time(make_op(cfg), (x,), ws)
        except Exception as e:  # noqa: BLE001 -- a config the compiler rejects must not hide the others
            print(f"  {label} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        split = ", ".join(f"{name} {v * 1e6:.2f}" for name, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"  {label} {cfg}: {t * 1e6:.1f} us, {nk:.0f} kernels ({split})", flush=True)
        if best is None or t < best[0]:
            best = (t, cfg, nk)
    if best is None:
        raise RuntimeError(f"{label}: no tile config compiled and ran")
    return best


def fp4_weights(key, lead, n, k, fmt, copies):
    out = []
    for c in range(copies):
        k1, k2, key = jax.random.split(key, 3)
        p = jax.random.randint(k1, (*lead, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        lo, hi = (0x08, 0x48) if fmt == "nvfp4" else (119, 130)
        s = jax.random.randint(k2, (*lead, n, k // BS[fmt]), lo, hi, jnp.int32).astype(jnp.uint8)
        out.append((p, s, jnp.ones(tuple(lead), jnp.float32)))
    return out


def hbm_ceiling() -> float:
    x = jnp.ones((1 << 30,), jnp.float32)                      # 4 GiB
    f = jax.jit(lambda a: a * 1.0001)
    t = timeit(f, x, reps=10)
    return 2 * x.nbytes / t / 1e9


def bf16_peak() -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * 8192**3 / timeit(f, a, b) / 1e12


def dense_row(m, n, k, fmt, hbm, configs=(None,), with_baselines=True):
    wbytes = n * k // 2 + n * k // BS[fmt]
    copies = max(2, -(-L2_ROTATE_BYTES // wbytes))
    key = jax.random.PRNGKey(m * 7 + n)
    ws = fp4_weights(key, (), n, k, fmt, copies)
    x = jax.random.normal(jax.random.PRNGKey(3), (m, k), jnp.bfloat16)
    row = dict(kind="dense", fmt=fmt, M=m, N=n, K=k, bytes=wbytes)
    cfgs = []
    for cfg in configs:
        if cfg == "flip":          # the default tiles on the other layout of x (split <-> interleaved), jnp decode
            d = default_config(m, n, k)
            cfg = None if d.gemv else dataclasses.replace(d, x_split=not d.x_split, decode="jnp")
        if cfg not in cfgs and not (isinstance(cfg, Fp4MatmulConfig) and (
                n % cfg.bn or (k // 2) % (cfg.bkh * cfg.split_k) or (cfg.gemv and m > GEMV_MAX_M))):
            cfgs.append(cfg)                  # each distinct config once (a flipped default may equal another)
    t, cfg, nk = fastest(f"dense {fmt} M={m} K={k} N={n}", cfgs,
                         lambda cfg: lambda x, p, s, g: fp4_matmul(x, p, s, g, fmt=fmt, config=cfg), x, ws)
    row.update(t_us=t * 1e6, cfg=str(cfg), kernels=nk, gbs=wbytes / t / 1e9, hbm_frac=wbytes / t / 1e9 / hbm,
               tflops=2 * m * n * k / t / 1e12)
    if with_baselines:
        ref = lambda x, p, s, g: fp4_matmul_reference(x, p, s, g, fmt=fmt)
        t_ref, row["kernels_ref"] = per_launch(ref, x, ws)
        row["t_ref_us"] = t_ref * 1e6
        bcopies = max(2, -(-L2_ROTATE_BYTES // (2 * n * k)))
        wb = [(jax.random.normal(jax.random.PRNGKey(100 + c), (n, k), jnp.bfloat16),) for c in range(bcopies)]
        xla = lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
        t_xla, row["kernels_xla"] = per_launch(xla, x, wb)
        row["t_xla_us"] = t_xla * 1e6
        row["xla_tflops"] = 2 * m * n * k / row["t_xla_us"] / 1e6
        row["vs_xla"] = row["t_xla_us"] / row["t_us"]
        row["vs_ref"] = row["t_ref_us"] / row["t_us"]
    return row


def k_reduce_cfgs(m: int, n: int, k: int) -> list:
    """The default tiles, then split-K tiles whose partials the kernel adds itself (k_reduce='kernel'). M <= 64: w_lhs
    tiles of M's size (8-row for M <= 8) over bn 32/64 (and 128 for M <= 8), bkh 128 (and 64 where K/2 has fewer
    than 16 such steps), every split that launches 224-1,024 programs, PTX decode. Larger M: 128- and 256-row w_lhs
    tiles on interleaved x (the prefill tiles), bn 64/128, splits that launch 128-1,024 programs."""
    h = k // 2
    out = [None]
    if m <= 64:
        bm = 8 if m <= 8 else 1 << (m - 1).bit_length()
        for bn in (32, 64, 128) if m <= 8 else (32, 64):
            for bkh in (64, 128) if h // 128 < 16 else (128,):
                steps = h // bkh
                for sk in (s for s in range(2, steps + 1) if steps % s == 0 and 224 <= n // bn * s <= 1024):
                    out.append(Fp4MatmulConfig(bm=bm, bn=bn, bkh=bkh, split_k=sk, w_lhs=True, k_reduce="kernel",
                                               num_stages=4, num_warps=4, decode="ptx"))
        if m <= 8:          # the XLA-summed twin of the default's tiles at twice its split
            d = default_config(m, n, k)
            if d.split_k > 1 and (h // d.bkh) % (2 * d.split_k) == 0:
                out.append(dataclasses.replace(d, split_k=d.split_k * 2))
        return list(dict.fromkeys(out))
    steps = h // 32
    for bm in (128, 256) if m > 128 else (128,):
        for bn in (64, 128):
            for sk in (2, 4, 7, 8, 14):
                if steps % sk == 0 and 128 <= n // bn * sk * -(-m // bm) <= 1024:
                    out.append(Fp4MatmulConfig(bm=bm, bn=bn, bkh=32, split_k=sk, w_lhs=True, k_reduce="kernel",
                                               x_split=False, num_warps=8, num_stages=3))
    return out


def grouped_sizes(rng, experts, lo, hi):
    return np.asarray(rng.integers(lo, hi + 1, size=experts), np.int32)


def grouped_row(experts, lo, hi, n, k, fmt, hbm, swiglu=False, configs=(None,), swiglu_w_lhs=False,
                swiglu_splits=None):
    rng = np.random.default_rng(experts * 100 + hi)
    sizes = jnp.asarray(grouped_sizes(rng, experts, lo, hi))
    t_rows = int(sizes.sum())
    mats = 3 if swiglu else 1
    wbytes = experts * mats * (n * k // 2 + n * k // BS[fmt])
    copies = max(2, -(-L2_ROTATE_BYTES // wbytes))
    x = jax.random.normal(jax.random.PRNGKey(5), (t_rows, k), jnp.bfloat16) * 0.1
    row = dict(kind="swiglu" if swiglu else "grouped", fmt=fmt, experts=experts, rows=t_rows, N=n, K=k,
               bytes=wbytes)
    if swiglu:          # gate/up [S, I=n, D=k], down [S, D, I]
        ws = [tuple(fp4_weights(jax.random.PRNGKey(10 * c + j), (experts,), *((k, n) if j == 2 else (n, k)), fmt, 1)[0]
                    for j in range(3)) for c in range(copies)]
        cfg = None
        if swiglu_w_lhs:    # the default tiles of both launches with the weight as the dot's left operand
            cfg = (dataclasses.replace(default_grouped(t_rows, n, k, experts), w_lhs=True),
                   dataclasses.replace(default_grouped(t_rows, k, n, experts), w_lhs=True))
            row["cfg"] = str(cfg)
        if swiglu_splits:   # (gate/up split_k, down split_k) pairs on the default tiles (split_k 1: as they are)
            gu, dn = default_grouped(t_rows, n, k, experts), default_grouped(t_rows, k, n, experts)
            cfgs = [None] + [(dataclasses.replace(gu, split_k=a, schedule="tiles"),
                              dataclasses.replace(dn, split_k=b, schedule="tiles")) for a, b in swiglu_splits
                             if not (k // 2 // gu.bkh % a or n // 2 // dn.bkh % b)]
            make = lambda cfg: lambda x, g, u, d: expert_swiglu(x, g, u, d, sizes, fmt=fmt, config=cfg)
            _, cfg, _ = fastest(f"swiglu {experts}e x {t_rows} rows", cfgs, make, x, ws)
            row["cfg"] = str(cfg)
        op = lambda x, g, u, d: expert_swiglu(x, g, u, d, sizes, fmt=fmt, config=cfg)
        ref = lambda x, g, u, d: expert_swiglu_reference(x, g, u, d, sizes, fmt=fmt)
        flops = 2 * t_rows * n * k * 3
    else:
        ws = fp4_weights(jax.random.PRNGKey(7), (experts,), n, k, fmt, copies)
        default = default_grouped(t_rows, n, k, experts)
        named = dict(flip=dict(x_split=not default.x_split, decode="jnp"),  # the default tiles on the other x layout,
                     ptx=dict(x_split=True, decode="ptx"),                  # on split x with the PTX decode,
                     slots=dict(schedule="slots", split_k=1),               # on the in-kernel slots schedule,
                     w_lhs=dict(w_lhs=True),                                # with the weight as the left operand
                     w_lhs8=dict(w_lhs=True, bm=8), w_lhs8_bn32=dict(w_lhs=True, bm=8, bn=32), w_lhs8_bn16=dict(w_lhs=True, bm=8, bn=16),
                     **{f"w_lhs8_slots{b}": dict(w_lhs=True, bm=8, schedule="slots", x_pairs=True, x_split=True,
                                                 decode="ptx", split_k=1, **bn)
                        for b, bn in (("", {}), ("_bn32", dict(bn=32)), ("_bn16", dict(bn=16)))},
                     slots_pairs=dict(schedule="slots", x_pairs=True, x_split=True, decode="ptx", split_k=1),
                     **{f"split{sk}{b}": dict(split_k=sk, **bn) for sk in (2, 4, 7, 8, 14)
                        for b, bn in (("", {}), ("_bn32", dict(bn=32)))})
        small = lambda c: not (isinstance(c, str) and c.startswith("w_lhs8") and default.bm > 16)   # 8-row tiles:
        steps = k // 2 // default.bkh
        fits = lambda c: not (isinstance(c, str) and c.startswith("split") and steps % named[c]["split_k"])
        cfgs = [dataclasses.replace(default, **named[c]) if isinstance(c, str) else c   # decode-sized groups only
                for c in configs if small(c) and fits(c)]
        cfgs = list(dict.fromkeys(cfgs))                           # each distinct config once
        make = lambda cfg: lambda x, p, s, g: moe_gmm(x, p, s, g, sizes, fmt=fmt, config=cfg)
        _, best, _ = fastest(f"grouped {experts}e x {t_rows} rows K={k} N={n}", cfgs, make, x, ws)
        op = make(best)
        row["cfg"] = str(best)
        ref = lambda x, p, s, g: moe_gmm_reference(x, p, s, g, sizes, fmt=fmt)
        flops = 2 * t_rows * n * k
    t, row["kernels"] = per_launch(op, x, ws)
    row.update(t_us=t * 1e6, gbs=wbytes / t / 1e9, hbm_frac=wbytes / t / 1e9 / hbm, tflops=flops / t / 1e12)
    t_ref, row["kernels_ref"] = per_launch(ref, x, ws)
    row["t_ref_us"] = t_ref * 1e6
    row["vs_ref"] = row["t_ref_us"] / row["t_us"]
    # XLA baseline: ragged_dot on bf16 slot weights
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (2,)), ((), ())),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    if not swiglu:
        bcopies = max(2, -(-L2_ROTATE_BYTES // (2 * experts * n * k)))
        wb = [(jax.random.normal(jax.random.PRNGKey(200 + c), (experts, n, k), jnp.bfloat16),) for c in range(bcopies)]
        xla = lambda x, w: jax.lax.ragged_dot_general(x, w, sizes, dims, preferred_element_type=jnp.float32).astype(x.dtype)
        t_xla, row["kernels_xla"] = per_launch(xla, x, wb)
        row["t_xla_us"] = t_xla * 1e6
        row["vs_xla"] = row["t_xla_us"] / row["t_us"]
    return row


def fmt_row(r):
    shape = (f"M={r['M']:<5d} K={r['K']} N={r['N']}" if r["kind"] == "dense"
             else f"{r['experts']}e x {r['rows']}rows K={r['K']} N={r['N']}")
    g = lambda key, f: (f % r[key]) if key in r else "-"
    return (f"| {r['kind']} {r['fmt']} | {shape} | {r['t_us']:.1f} | {r['gbs']:.0f} | {100 * r['hbm_frac']:.0f}% | "
            f"{r['tflops']:.1f} | {g('t_xla_us', '%.1f')} | {g('vs_xla', '%.2fx')} | {g('t_ref_us', '%.1f')} | "
            f"{g('vs_ref', '%.2fx')} | {g('kernels', '%.0f')}/{g('kernels_xla', '%.0f')}/{g('kernels_ref', '%.0f')} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="try several decode tile configs, report the best")
    ap.add_argument("--parts", default="dense,grouped,swiglu", help="which kernels to measure")
    ap.add_argument("--ms", default=None, help="dense M values (default 1,8,32,256,4096; --quick 1,8,4096)")
    ap.add_argument("--one-launch", action="store_true",
                    help="sweep the one-launch forms (x read as column pairs in the kernel, split_k 1; grouped on the "
                         "slots schedule) against the defaults, instead of --sweep's tile sweep")
    ap.add_argument("--w-lhs", action="store_true",
                    help="sweep tiles with the weight as the dot's left operand (w_lhs; 8-row tiles for small M) "
                         "against the defaults")
    ap.add_argument("--k-reduce", action="store_true",
                    help="sweep split-K tiles whose partial sums the kernel adds itself (k_reduce='kernel'; grouped: "
                         "split_k) against the defaults (k_reduce_cfgs: which tiles at which M)")
    ap.add_argument("--groups", default="8x1-8,64x1-8,64x48-80",
                    help="grouped shapes: EXPERTSxLO-HI rows per expert, comma-separated (swiglu: those of 8x1-8 and "
                         "64x48-80 listed)")
    ap.add_argument("--fmts", default="nvfp4,mxfp4", help="formats measured at M=8 and 4096 (nvfp4 elsewhere)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    hbm = hbm_ceiling()
    peak = bf16_peak()
    print(f"HBM copy ceiling {hbm:.0f} GB/s; bf16 XLA 8192^3 {peak:.0f} TFLOP/s", flush=True)
    rows = []

    def save():             # after every row: a run stopped at the time limit keeps what it measured
        if args.out:
            with open(args.out + ".tmp", "w") as f:
                json.dump(dict(hbm_gbs=hbm, bf16_tflops=peak, device=jax.devices()[0].device_kind, rows=rows), f,
                          indent=1)
            os.replace(args.out + ".tmp", args.out)

    dec_cfgs = (None,)
    if args.sweep:
        dec_cfgs = (None, "flip",
                    Fp4MatmulConfig(bm=16, bn=32, bkh=128, split_k=4, num_warps=4, num_stages=4),
                    Fp4MatmulConfig(bm=16, bn=64, bkh=256, split_k=2, num_warps=8, num_stages=3),
                    Fp4MatmulConfig(bm=16, bn=16, bkh=256, split_k=2, num_warps=2, num_stages=4),
                    Fp4MatmulConfig(bm=16, bn=32, bkh=512, split_k=1, num_warps=4, num_stages=3),
                    *(Fp4MatmulConfig(bn=bn, bkh=bkh, split_k=sk, num_warps=w, num_stages=st, gemv=True)
                      for bn, bkh, sk, w, st in ((16, 256, 1, 4, 3), (16, 512, 1, 4, 3), (32, 256, 1, 4, 4),
                                                 (16, 128, 2, 4, 4), (64, 128, 1, 8, 3), (32, 512, 1, 8, 2))),
                    # the packed-pair PTX decode on run 5's fastest MMA tiles and two neighbours
                    *(Fp4MatmulConfig(bm=16, bn=bn, bkh=bkh, split_k=sk, num_warps=4, num_stages=4, decode="ptx")
                      for bn, bkh, sk in ((32, 128, 4), (64, 128, 4), (32, 256, 2))))
    pre_cfgs = (None,)
    if args.sweep:
        pre_cfgs = (None, "flip", Fp4MatmulConfig(bm=256, bn=128, bkh=32, num_warps=8, num_stages=3),
                    Fp4MatmulConfig(bm=128, bn=256, bkh=32, num_warps=8, num_stages=3),
                    Fp4MatmulConfig(bm=128, bn=128, bkh=32, num_warps=8, num_stages=3, x_split=False),
                    Fp4MatmulConfig(bm=128, bn=128, bkh=64, num_warps=8, num_stages=4),
                    Fp4MatmulConfig(bm=128, bn=128, bkh=32, num_warps=8, num_stages=3, decode="ptx"),
                    Fp4MatmulConfig(bm=256, bn=128, bkh=32, num_warps=8, num_stages=3, decode="ptx"))
    mid_cfgs = (None,)        # 64 < M < 1024: the default launches few programs (32 at M=256, N=2048); split-K tiles
    if args.sweep:
        mid_cfgs = (None, "flip", Fp4MatmulConfig(bm=64, bn=64, bkh=128, split_k=4, num_warps=4, num_stages=4),
                    Fp4MatmulConfig(bm=64, bn=64, bkh=128, split_k=4, num_warps=4, num_stages=4, decode="ptx"),
                    Fp4MatmulConfig(bm=128, bn=64, bkh=64, split_k=2, num_warps=8, num_stages=3, x_split=False),
                    Fp4MatmulConfig(bm=64, bn=128, bkh=32, split_k=4, num_warps=8, num_stages=3, x_split=False))
    if args.one_launch:     # decode: one launch (split_k 1, x as pairs); the split-K default with x as pairs (2)
        pairs = dict(bm=16, num_warps=4, x_pairs=True, decode="ptx")
        dec_cfgs = (None, *(Fp4MatmulConfig(bn=bn, bkh=bkh, split_k=sk, num_stages=st, **pairs)
                            for bn, bkh, sk, st in ((32, 128, 4, 4), (16, 256, 1, 4), (16, 512, 1, 3), (16, 128, 1, 6),
                                                    (32, 256, 1, 4), (64, 128, 1, 4))),
                    Fp4MatmulConfig(bm=16, bn=16, bkh=256, split_k=1, num_warps=2, num_stages=4, x_pairs=True,
                                    decode="ptx"))
        pre_cfgs = (None, Fp4MatmulConfig(bm=256, bn=128, bkh=32, num_warps=8, num_stages=3, x_pairs=True))
        mid_cfgs = (None, Fp4MatmulConfig(bm=64, bn=64, bkh=128, split_k=1, num_warps=4, num_stages=4, x_pairs=True,
                                          decode="ptx"))
    if args.w_lhs:          # kernel run 8: the weight as the dot's left operand, 8-row tiles, more programs
        lhs = dict(w_lhs=True, num_warps=4, num_stages=4, decode="ptx")
        dec_cfgs = (None, *(Fp4MatmulConfig(bm=8, bn=bn, bkh=128, split_k=sk, **lhs)
                            for bn, sk in ((64, 7), (64, 4), (32, 14), (16, 7), (64, 14), (128, 7), (32, 8),
                                           (64, 8), (16, 4))))
        pre_cfgs = (None, *(Fp4MatmulConfig(bm=bm, bn=bn, bkh=32, w_lhs=True, num_warps=8, num_stages=st, x_split=xs,
                                            decode="jnp" if not xs else "ptx")
                            for bm, bn, st, xs in ((256, 128, 3, False), (128, 128, 3, False), (256, 64, 3, False),
                                                   (128, 256, 3, False), (256, 128, 3, True))))
        mid_cfgs = (None, Fp4MatmulConfig(bm=64, bn=64, bkh=128, split_k=4, w_lhs=True, num_warps=4, num_stages=4,
                                          decode="ptx"),
                    Fp4MatmulConfig(bm=128, bn=64, bkh=64, split_k=2, w_lhs=True, num_warps=8, num_stages=3,
                                    x_split=False))
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (1, 8, 4096) if args.quick else (1, 8, 32, 256, 4096)
    pick = lambda m, n, k: dec_cfgs if m <= 64 else pre_cfgs if m >= 1024 else mid_cfgs
    if args.k_reduce:
        pick = k_reduce_cfgs
    for k, n in ((7168, 2048), (2048, 7168)) if "dense" in parts else ():
        for m in ms:
            for fmt in args.fmts.split(",") if m in (8, 4096) else ("nvfp4",):
                cfgs = pick(m, n, k)
                try:
                    rows.append(dense_row(m, n, k, fmt, hbm, configs=cfgs))
                    save()
                    print(fmt_row(rows[-1]), rows[-1]["cfg"], flush=True)
                except Exception as e:  # noqa: BLE001 -- report and continue: one failing shape must not hide the rest
                    print(f"FAILED dense {fmt} M={m} K={k} N={n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    g_cfgs = (None,) if not args.sweep else (None, "flip", "ptx",
                                               MoeGmmConfig(bm=16, bn=32, bkh=128, num_warps=4, num_stages=4),
                                               MoeGmmConfig(bm=16, bn=128, bkh=64, num_warps=4, num_stages=4),
                                               MoeGmmConfig(bm=16, bn=32, bkh=128, num_warps=4, num_stages=4,
                                                            decode="ptx"))
    if args.one_launch:
        one = dict(schedule="slots", x_pairs=True, decode="ptx")
        g_cfgs = (None, "ptx", "slots", *(MoeGmmConfig(bm=16, bn=bn, bkh=bkh, num_warps=w, num_stages=st, **one)
                                          for bn, bkh, w, st in ((64, 128, 4, 4), (32, 128, 4, 4), (64, 256, 4, 3),
                                                                 (128, 128, 8, 4), (64, 128, 4, 6))),
                  MoeGmmConfig(bm=16, bn=64, bkh=128, num_warps=4, num_stages=4, x_pairs=True, decode="ptx"))
    if args.k_reduce:       # grouped split-K (the last program of a tile adds the partials) on the default tiles
        g_cfgs = (None, "slots_pairs", *(f"split{s}" for s in (2, 4, 7, 8, 14)), "split4_bn32", "split7_bn32")
    if args.w_lhs:
        g_cfgs = (None, "w_lhs", "w_lhs8", "w_lhs8_bn32", "w_lhs8_bn16", "w_lhs8_slots", "w_lhs8_slots_bn32",
                  "w_lhs8_slots_bn16")
    groups = [tuple(int(v) for v in g.replace("x", "-").split("-")) for g in args.groups.split(",")]
    for experts, lo, hi in groups if "grouped" in parts else ():
        for k, n in ((7168, 2048), (2048, 7168)):
            try:
                rows.append(grouped_row(experts, lo, hi, n, k, "nvfp4", hbm, configs=g_cfgs))
                save()
                print(fmt_row(rows[-1]), rows[-1].get("cfg"), flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"FAILED grouped {experts}e K={k} N={n}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    for experts, lo, hi in [g for g in ((8, 1, 8), (64, 48, 80)) if g in groups] if "swiglu" in parts else ():
        try:
            splits = ((1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (7, 1), (7, 2), (4, 4)) if args.k_reduce else None
            rows.append(grouped_row(experts, lo, hi, 2048, 7168, "nvfp4", hbm, swiglu=True, swiglu_w_lhs=args.w_lhs,
                                    swiglu_splits=splits))
            save()
            print(fmt_row(rows[-1]), flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"FAILED swiglu {experts}e: {type(e).__name__}: {str(e)[:300]}", flush=True)
    save()
    print(f"\nHBM copy ceiling {hbm:.0f} GB/s; bf16 XLA 8192^3 {peak:.0f} TFLOP/s; device {jax.devices()[0].device_kind}")
    print("| kernel | shape | GPU us | GB/s packed | % HBM | TFLOP/s | XLA bf16 us | vs XLA | jnp ref us | vs ref "
          "| GPU kernels per op (ours/XLA/ref) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(fmt_row(r))


if __name__ == "__main__":
    main()

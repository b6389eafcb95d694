"""Where the dense decode kernel's time goes (issue 3): the same launch shapes with stages left out.

For one decode shape (M rows, K, N; NVFP4) and several launch shapes (bn, bkh, split_k, warps, stages), times:
  load    - a Pallas kernel that only streams the packed bytes and scales (sums them, so no load can be dropped);
  decode  - load + the PTX nibble decode (sums the decoded bf16 tiles);
  full    - the real kernel (fp4_matmul with those tiles): load + decode + the bf16 dots, plus the split-K sum;
and XLA's own floor on the same bytes (a uint8 row sum) and its bf16 matmul. Differences between the rows place the
time: load alone against the HBM ceiling says whether the launch shape can stream 8 MB at all.

GPU time per op from profiler traces (kernel durations, split by kernel name), weights rotated over >= 256 MB.
On the GPU machine, after the `dsjax_kernels` link (bench/RESULTS.md):

    PYTHONPATH=/tmp/pp:$PWD python3 bench/kernel_anatomy.py --out $OUT/anatomy.json

`--ncu` runs each variant of the default launch shape, the full kernel with the weight as the dot's left operand
(w_lhs, 8-row tiles) and the default grouped decode kernel (8 experts x 1-8 rows) twice and nothing else, for
Nsight Compute (what to read: DRAM throughput against peak, achieved occupancy and the registers that cap it, the
top warp stall reasons; without preallocation ncu does not save and restore most of the GPU's memory per pass):

    XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none --kernel-name regex:"anat|fp4_matmul|moe_gmm|gemm" \\
        --launch-count 12 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \\
        python3 bench/kernel_anatomy.py --ncu > $OUT/ncu.txt
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsjax_kernels.fp4_matmul import Fp4MatmulConfig, fp4_matmul
from dsjax_kernels.fp4_matmul.decode import decode_halves
from dsjax_kernels.moe_gmm import moe_gmm

from kernel_bench import L2_ROTATE_BYTES, fp4_weights, gpu_time, hbm_ceiling

# (bn, bkh, split_k, num_warps, num_stages); K=7168 has 3584 packed bytes per row: 28 steps of 128, 14 of 256
SHAPES = ((32, 128, 4, 4, 4),      # the default decode tiles (256 programs, 7 steps of 4 KB)
          (64, 128, 4, 4, 4), (64, 128, 7, 4, 4), (32, 256, 2, 4, 4), (32, 128, 14, 4, 4), (16, 256, 7, 4, 4),
          (128, 128, 7, 8, 4), (64, 256, 7, 8, 3), (64, 256, 2, 8, 4), (32, 128, 7, 4, 6))


def _anat_kernel(p_ref, s_ref, o_ref, *, stage: str, bn: int, bkh: int, k_steps: int, interpret: bool):
    """Grid (N/bn, split_k): stream [bn, bkh] packed bytes and [bn, bkh/8] scales per K step; 'load' sums them as
    float32, 'decode' sums the PTX-decoded bf16 halves. o_ref [split_k, N] float32 row sums."""
    sg = bkh // 8                                                   # NVFP4: 16 elements = 8 bytes per scale
    i_n, i_k = pl.program_id(0), pl.program_id(1)
    n0 = i_n * bn
    h_base = i_k * (k_steps * bkh)

    def step(t, accs):
        acc, acc_s = accs
        h0 = pl.multiple_of(h_base + t * bkh, bkh)
        p = p_ref[pl.ds(n0, bn), pl.ds(h0, bkh)]
        s = s_ref[pl.ds(n0, bn), pl.ds(h0 // 8, sg)]
        if stage == "load":
            return acc + p.astype(jnp.float32), acc_s + s.astype(jnp.float32)
        lo, hi = decode_halves(p, s, "nvfp4", jnp.bfloat16, "ptx", interpret)
        return acc + (lo.astype(jnp.float32) + hi.astype(jnp.float32)), acc_s

    acc, acc_s = jax.lax.fori_loop(0, k_steps, step, (jnp.zeros((bn, bkh), jnp.float32),
                                                       jnp.zeros((bn, sg), jnp.float32)))
    o_ref[i_k, pl.ds(n0, bn)] = jnp.sum(acc, axis=1) + jnp.sum(acc_s, axis=1)


@functools.partial(jax.jit, static_argnames=("stage", "shape", "interpret"))
def anat(p, s, *, stage: str, shape: tuple, interpret: bool = False) -> jax.Array:
    """[split_k, N] float32 partial row sums of the streamed (and for 'decode', decoded) weight."""
    bn, bkh, split, warps, stages = shape
    n, h = p.shape
    kernel = functools.partial(_anat_kernel, stage=stage, bn=bn, bkh=bkh, k_steps=h // bkh // split,
                               interpret=interpret)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((split, n), jnp.float32), grid=(n // bn, split),
                          compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
                          interpret=interpret, name=f"anat_{stage}")(p, s)


def full_cfg(shape) -> Fp4MatmulConfig:
    bn, bkh, split, warps, stages = shape
    return Fp4MatmulConfig(bm=16, bn=bn, bkh=bkh, split_k=split, num_warps=warps, num_stages=stages, decode="ptx")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--k", type=int, default=7168)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--ncu", action="store_true", help="run the default shape's variants twice each, no timing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cpu = jax.default_backend() == "cpu"            # CPU: the Pallas interpreter, wall time (a smoke run, not a figure)
    m, k, n = args.m, args.k, args.n
    wbytes = n * k // 2 + n * k // 16
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    if args.ncu:
        (p, s, g), = fp4_weights(key, (), n, k, "nvfp4", 1)
        wb = jax.random.normal(key, (n, k), jnp.bfloat16)
        sizes = jnp.asarray([1, 2, 8, 3, 5, 7, 4, 3], jnp.int32)
        pg, sg = jnp.broadcast_to(p, (8, *p.shape)), jnp.broadcast_to(s, (8, *s.shape))
        xg = jax.random.normal(key, (int(sizes.sum()), k), jnp.bfloat16)
        for _ in range(2):
            jax.block_until_ready(anat(p, s, stage="load", shape=SHAPES[0]))
            jax.block_until_ready(anat(p, s, stage="decode", shape=SHAPES[0]))
            jax.block_until_ready(fp4_matmul(x, p, s, g, fmt="nvfp4", config=full_cfg(SHAPES[0])))
            jax.block_until_ready(fp4_matmul(x, p, s, g, fmt="nvfp4", config=Fp4MatmulConfig(
                bm=8, bn=32, bkh=128, split_k=4, num_warps=4, num_stages=4, decode="ptx", w_lhs=True)))
            jax.block_until_ready(jax.jit(lambda x, w: jnp.dot(x, w.T).astype(x.dtype))(x, wb))
            jax.block_until_ready(moe_gmm(xg, pg, sg, jnp.ones((8,), jnp.float32), sizes, fmt="nvfp4"))
        print("ran the default shape's load / decode / full (and w_lhs) kernels, XLA's bf16 matmul and the default "
              "grouped decode kernel (8 experts x 1-8 rows), twice each")
        return
    hbm = hbm_ceiling()
    print(jax.devices()[0].device_kind, f"HBM copy ceiling {hbm:.0f} GB/s; M={m} K={k} N={n}: {wbytes / 1e6:.2f} MB "
          "packed + scales per op", flush=True)
    copies = max(2, -(-L2_ROTATE_BYTES // wbytes))
    ws = [(p, s) for p, s, _ in fp4_weights(key, (), n, k, "nvfp4", copies)]
    wsg = [(p, s, jnp.ones((), jnp.float32)) for p, s in ws]
    rows = []

    def add(label, shape, fn, args, wlist):
        try:
            t, _, parts = gpu_time(fn, args, wlist)
        except Exception as e:  # noqa: BLE001 -- a variant the compiler rejects must not hide the others
            print(f"{label} {shape}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            return
        rows.append(dict(variant=label, shape=shape, t_us=t * 1e6, gbs=wbytes / t / 1e9, hbm_frac=wbytes / t / 1e9 / hbm,
                         kernels={name: v * 1e6 for name, v in parts.items()}))
        print(f"{label:7s} {str(shape):22s} {t * 1e6:7.2f} us {wbytes / t / 1e9:7.0f} GB/s {wbytes / t / 1e9 / hbm:5.1%}"
              f"  {', '.join(f'{nm} {v * 1e6:.2f}' for nm, v in parts.items())}", flush=True)

    for shape in SHAPES[:2] if cpu else SHAPES:
        if n % shape[0] or (k // 2) % (shape[1] * shape[2]):
            continue
        for stage in ("load", "decode"):
            add(stage, shape, lambda p, s, stage=stage, shape=shape: anat(p, s, stage=stage, shape=shape,
                                                                          interpret=cpu), (), ws)
        cfg = full_cfg(shape)
        add("full", shape, lambda x, p, s, g, cfg=cfg: fp4_matmul(x, p, s, g, fmt="nvfp4", config=cfg,
                                                                               interpret=cpu), (x,), wsg)
    add("xla_sum", "-", lambda p, s: (jnp.sum(p, axis=1, dtype=jnp.int32), jnp.sum(s, axis=1, dtype=jnp.int32)), (), ws)
    bcopies = max(2, -(-L2_ROTATE_BYTES // (2 * n * k)))
    wb = [(jax.random.normal(jax.random.PRNGKey(100 + c), (n, k), jnp.bfloat16),) for c in range(bcopies)]
    xla_t, _, xla_parts = gpu_time(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype),
                                 (x,), wb)
    print(f"xla bf16 matmul: {xla_t * 1e6:.2f} us for {2 * n * k / 1e6:.1f} MB ({2 * n * k / xla_t / 1e9:.0f} GB/s) "
          f"{xla_parts}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, hbm_gbs=hbm, m=m, k=k, n=n, bytes=wbytes,
                           xla_bf16_us=xla_t * 1e6, rows=rows), f, indent=1)
    print(f"\n| variant | bn, bkh, split, warps, stages | GPU us | GB/s | % HBM ({hbm:.0f} GB/s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['shape']} | {r['t_us']:.2f} | {r['gbs']:.0f} | {r['hbm_frac']:.0%} |")
    print(f"| xla bf16 matmul | - | {xla_t * 1e6:.2f} | {2 * n * k / xla_t / 1e9:.0f} (bf16 bytes) | "
          f"{2 * n * k / xla_t / 1e9 / hbm:.0%} |")


if __name__ == "__main__":
    main()

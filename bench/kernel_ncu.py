"""The decode kernels under Nsight Compute: why 8 MB of FP4 weight takes 10 us (issue 3).

Runs the default dense decode kernel (M=8, K=7168, N=2048, NVFP4) and the grouped decode kernel (8 experts x 1-8
rows) a few times each, so that `ncu` can profile one launch of each with the hardware counters (the H200 machine
runs Firecracker, where ncu reads them; leave the clocks alone). On the GPU machine, after the `dsjax_kernels` link
(bench/RESULTS.md):

    ncu --clock-control none --kernel-name regex:"fp4_matmul|moe_gmm" --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats python3 bench/kernel_ncu.py > $OUT/ncu.txt

What to read: DRAM throughput against its peak (the bar is 60%), achieved occupancy and the registers per thread
that cap it, and the top warp stall reasons (long scoreboard = waiting on global loads: too few bytes in flight;
barrier / MIO = the layout conversions feeding the MMA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsjax_kernels.fp4_matmul import fp4_matmul
from dsjax_kernels.moe_gmm import moe_gmm


def main(reps: int = 4) -> None:
    key = jax.random.PRNGKey(0)
    m, k, n = 8, 7168, 2048
    p = jax.random.randint(key, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    s = jax.random.randint(key, (n, k // 16), 0x08, 0x48, jnp.int32).astype(jnp.uint8)
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    g = jnp.ones((), jnp.float32)
    sizes = jnp.asarray([1, 2, 8, 3, 5, 7, 4, 3], jnp.int32)
    pg = jnp.broadcast_to(p, (8, n, k // 2))
    sg = jnp.broadcast_to(s, (8, n, k // 16))
    xg = jax.random.normal(key, (int(sizes.sum()), k), jnp.bfloat16)
    for _ in range(reps):
        jax.block_until_ready(fp4_matmul(x, p, s, g, fmt="nvfp4"))
    for _ in range(reps):
        jax.block_until_ready(moe_gmm(xg, pg, sg, jnp.ones((8,), jnp.float32), sizes, fmt="nvfp4"))
    print("ran", reps, "dense and", reps, "grouped decode launches")


if __name__ == "__main__":
    main()

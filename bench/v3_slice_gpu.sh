#!/usr/bin/env bash
# Issue 5 on the GPU machine: the real-width DeepSeek-V3 slice, generated and measured in steps that resume
# (rerun the same command; finished steps are skipped, rows already in a result JSON are kept).
#   OUT=/some/dir bash bench/v3_slice_gpu.sh [MOE_LAYERS]
# Writes $OUT/v3_*.json/.md (dsjax bench) and $OUT/v3_traces.tgz (profiler traces of each configuration's decode).
set -u
OUT=${OUT:-/tmp/dsjax-bench}
N=${1:-6}
S=${V3_SLICE:-/tmp/v3-slice-$N}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[v3-slice +$(( $(date +%s) - T0 ))s] $*"; }
stamp "generating $S ($N MoE layers)"
python3 bench/make_v3_slice.py "$S" --moe-layers "$N" 2>&1 | grep -v -E "WARNING|it/s\]$" | tail -3
du -sh "$S"
# 1. the seed's budgets: 16 GB GPU, 96 GB pinned host (the slice fits the host tier: experts stream host->GPU);
#    against everything resident in HBM and load-on-demand (overlap_io off), batches 1, 8, 32.
stamp "bench 16GB/96GB"
timeout 330 python3 -m dsjax.cli bench "$S" --gpu-memory 16GB --host-memory 96GB --batches 1,8,32 --tokens 12 \
  --prompt-len 32 --out "$OUT/v3_16GB_96GB.json" --trace-dir /tmp/v3-traces/16GB_96GB 2>&1 | grep -v WARNING | tail -12
# 2. a host tier smaller than the model, as 96 GB is for the 380 GB of V3 in NVFP4: experts also come from disk,
#    page cache dropped before each measured generation.
stamp "bench 16GB/12GB cold"
timeout 200 python3 -m dsjax.cli bench "$S" --gpu-memory 16GB --host-memory 12GB --configs budget,on_demand \
  --batches 1,8 --tokens 8 --prompt-len 32 --cold --out "$OUT/v3_16GB_12GB_cold.json" \
  --trace-dir /tmp/v3-traces/16GB_12GB 2>&1 | grep -v WARNING | tail -8
tar czf "$OUT/v3_traces.tgz" -C /tmp v3-traces 2>/dev/null
stamp "done"

#!/usr/bin/env bash
# Issue 5 on the GPU machine: the real-width DeepSeek-V3 slice, generated (~60 s for 44.8 GB with 16 workers) and
# measured in steps that resume across calls:
#   OUT=/some/dir [BATCHES=1,8] [TRACE=0] [DISK_CONFIGS=budget,on_demand] [DISK_BATCHES=1,8] [DISK_SET=k=v] bash bench/v3_slice_gpu.sh [MOE_LAYERS] [STEP...]
# STEP: seed (= budget,on_demand,resident,hbm in one process, sharing executables; only budget is profiled) | budget |
# resident | on_demand | hbm (16 GB GPU / 96 GB host, batches $BATCHES) | threshold (budget with expert_threshold
# $THRESHOLD, default 0.8, untraced) | disk (16 GB / 12 GB host tier, page cache
# dropped before each measured generation). Default: seed disk. Results: $OUT/v3_<budgets>.json
# (+ .md), row by row; a result already in bench/results/ (committed from an earlier call) is copied to $OUT first,
# so its rows are kept and only the missing ones are measured. Traces: /tmp/v3-traces (summaries are in the JSON).
set -u
OUT=${OUT:-/tmp/dsjax-bench}
N=${1:-6}
shift || true
STEPS=${*:-seed disk}
BATCHES=${BATCHES:-1,8,32}
TOKENS=${TOKENS:-8}
S=${V3_SLICE:-/tmp/v3-slice-$N}
NOTRACE=; [ "${TRACE:-1}" = 0 ] && NOTRACE=--no-trace      # TRACE=0: no profiler trace (GPU busy fraction not measured)
mkdir -p "$OUT"
# Compiled executables persist across calls when the previous call's cache is carried back in: the call tars
# .xla-cache into $OUT (15 MB parts); unpack it in the repo (`cat xla-cache.tgz.* | tar xz`) and name .xla-cache in
# the next run's `carry` (64 MiB at most). The first generation at V3 widths compiled for 58 s (batch 1), 155 s (8).
export DSJAX_COMPILE_CACHE=${DSJAX_COMPILE_CACHE:-$PWD/.xla-cache}
save_cache() { [ -d .xla-cache ] && tar czf - .xla-cache | split -b 15m - "$OUT/xla-cache.tgz."; true; }
trap save_cache EXIT
T0=$(date +%s)
stamp() { echo "[v3-slice +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }
resume() { [ -f "bench/results/$1" ] && [ ! -f "$OUT/$1" ] && cp "bench/results/$1" "$OUT/$1"; true; }
mem() { stamp "memory: $(free -g | awk '/^Mem/ {print $3 " GiB used, " $7 " GiB available"}'); $(df -h "$(dirname "$S")" | awk 'NR==2 {print $1 " " $3 " used of " $2}')"; }
mem          # the disk step's batch-8 process once died without a message: watch memory (and what backs the store)
# Memory every 5 s while benches run (run 5: the cold batch-8 process was SIGKILLed, exit 137, after its warm-up):
# machine used / page cache, and the bench process's resident, locked and pinned memory.
( while sleep 5; do
    p=$(pgrep -f "dsjax.cli bench" | head -1)
    st=$([ -n "$p" ] && awk '/^(VmRSS|VmLck|VmPin)/ {printf "%s %d MB  ", $1, $2 / 1024}' /proc/$p/status 2>/dev/null)
    echo "$(date +%T) $(free -m | awk '/^Mem/ {print "used " $3 " MB, cache " $6 " MB"}')  bench: ${st:--}"
  done ) >> "$OUT/mem.log" 2>&1 &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null; save_cache' EXIT
stamp "generating $S ($N MoE layers)"
python3 bench/make_v3_slice.py "$S" --moe-layers "$N" 2>&1 | grep -v -E "WARNING|it/s\]$|B/s\]$" | tail -2
for step in $STEPS; do
  case $step in
    seed|budget|resident|on_demand|hbm)
      f=v3_slice_16GB_96GB.json; resume $f
      configs=$step; [ "$step" = seed ] && configs=budget,on_demand,resident,hbm
      stamp "bench 16GB/96GB $configs"
      python3 -m dsjax.cli bench "$S" --gpu-memory 16GB --host-memory 96GB --configs "$configs" --batches "$BATCHES" \
        --tokens "$TOKENS" --prompt-len 32 --out "$OUT/$f" --trace-configs budget --trace-dir /tmp/v3-traces/16GB_96GB $NOTRACE \
        2>&1 | grep --line-buffered -v WARNING | tee -a "$OUT/log.txt" | tail -6
      stamp "bench exit status ${PIPESTATUS[0]}"; mem ;;
    threshold)   # budget config with a stricter prediction threshold (fewer wasted copies on a saturated link)
      f=v3_slice_16GB_96GB_threshold${THRESHOLD:-0.8}.json; resume $f
      stamp "bench 16GB/96GB budget, expert_threshold ${THRESHOLD:-0.8}"
      python3 -m dsjax.cli bench "$S" --gpu-memory 16GB --host-memory 96GB --configs budget --batches "$BATCHES" \
        --tokens "$TOKENS" --prompt-len 32 --out "$OUT/$f" --no-trace --set "expert_threshold=${THRESHOLD:-0.8}" \
        2>&1 | grep --line-buffered -v WARNING | tee -a "$OUT/log.txt" | tail -6
      stamp "bench exit status ${PIPESTATUS[0]}"; mem ;;
    disk)        # DISK_SET=key=value: one runtime option for these rows (e.g. disk_prefetch_layers=0), own result file
      f=v3_slice_16GB_12GB_cold${DISK_SET:+_${DISK_SET//=/}}.json; resume $f
      stamp "bench 16GB/12GB cold ${DISK_SET:-}"
      python3 -m dsjax.cli bench "$S" --gpu-memory 16GB --host-memory 12GB --configs "${DISK_CONFIGS:-budget,on_demand}" --batches "${DISK_BATCHES:-1,8}" \
        ${DISK_SET:+--set "$DISK_SET"} \
        --tokens "$TOKENS" --prompt-len 32 --cold --out "$OUT/$f" --trace-dir /tmp/v3-traces/16GB_12GB $NOTRACE 2>&1 \
        | grep --line-buffered -v WARNING | tee -a "$OUT/log.txt" | tail -6
      stamp "bench exit status ${PIPESTATUS[0]}"; mem ;;
  esac
done
stamp "done"

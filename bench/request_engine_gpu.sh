#!/usr/bin/env bash
# The request-level engine on the GPU machine (issue 19), in resumable steps that each fit one 10-minute call:
#   bash bench/request_engine_gpu.sh setup          # V3 slice (6 MoE layers, ~45 GB) + the GPU tests of the runtime
#   bash bench/request_engine_gpu.sh bench NEW|OLD BATCHES   # dsjax bench budget,on_demand 16GB/96GB (OLD: the tree in
#                                                   # .old/, e.g. `git archive 7375483 dsjax kernels configs bench`)
#   bash bench/request_engine_gpu.sh slice | gputests   # the slice alone | the CPU path's GPU tests
#   bash bench/request_engine_gpu.sh arrivals [KEY=VALUE]   # bench/arrivals.py: 32 Poisson arrivals vs the static
#                                                   # batch 32 (KEY=VALUE: a runtime option, e.g. step_tokens=1024)
#   bash bench/request_engine_gpu.sh serve [CONC] [KEY=VALUE]  # dsjax serve + bench/serve_load.py at 1, 8, 32, 64 streams
#                                                   # (SERVE_ARGS: more `dsjax serve` options, e.g. --set compile_ahead=on;
#                                                   # LOAD_LENS: serve_load's lengths, default --prompt-len 32:512 --output-len 16:128)
#   bash bench/request_engine_gpu.sh copies         # bench/copy_paths.py: issue time of expert copies by path
#   bash bench/request_engine_gpu.sh copyjit        # bench b1 with --set expert_copy=jit (beside 'bench NEW 1')
#   bash bench/request_engine_gpu.sh warmthreads [0,8]  # bench/warmup_threads.py: warm-up wall by compile threads
#   bash bench/request_engine_gpu.sh gaps           # bench/join_gaps.py: a joining request's stall, compile ahead on/off
#   bash bench/request_engine_gpu.sh multi [N]      # on N GPUs (nvidia-h100-x2 ...): tiered expert parallelism vs one GPU
#   bash bench/request_engine_gpu.sh pinlimit [GiB]  # b1 on_demand's RSS under dsjax's pinned-pool cap vs a limit of GiB (90% RAM)
#   bash bench/request_engine_gpu.sh hot [N] | options | hbm   # b1 with N hot experts per layer (popularity measured
#                                                   # first) | with active_experts 6 and 4 | the whole slice in HBM
#   OUT=/tmp/res setsid nohup bash bench/request_engine_gpu.sh all > /tmp/res/pipeline.log 2>&1 &
#                                                   # every step in order, in the background of one warm machine
# Results go to $OUT (JSON + logs); the slice and the compile caches stay in /tmp while the machine is warm.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=${SLICE:-/tmp/v3-slice-6}
BUDGET=(--gpu-memory 16GB --host-memory 96GB)
use_tree() {          # $1: a source tree with dsjax/ and kernels/ (imported as dsjax_kernels); run from inside it
  mkdir -p "/tmp/pp-$2" && ln -sfn "$ROOT/$1/kernels" "/tmp/pp-$2/dsjax_kernels"
  export PYTHONPATH="/tmp/pp-$2:$ROOT/$1" DSJAX_COMPILE_CACHE="/tmp/xla-$2"
  cd "$ROOT/$1"
}
case "${1:-}" in
  setup)
    nvidia-smi -L
    use_tree "${NEW_TREE:-.}" new
    [ -f "$S/manifest.json" ] || python3 bench/make_v3_slice.py "$S" --moe-layers 6 2>&1 | tail -2
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_runtime.py tests/test_cpu_path.py tests/test_cpu_experts.py \
      2>&1 | tail -3
    ;;
  slice)               # the slice alone (no tests)
    use_tree "${NEW_TREE:-.}" new
    [ -f "$S/manifest.json" ] || python3 bench/make_v3_slice.py "$S" --moe-layers 6 2>&1 | tail -1
    ;;
  gputests)            # the GPU tests of the CPU experts' path
    use_tree "${NEW_TREE:-.}" new
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cpu_path.py 2>&1 | tail -3
    ;;
  bench)
    if [ "$2" = OLD ]; then use_tree .old old; else use_tree "${NEW_TREE:-.}" new; fi
    python3 -c 'import dsjax, sys; print("dsjax from", dsjax.__file__, file=sys.stderr)'
    configs=budget,on_demand; [ "$2" = NEW ] && configs=budget,on_demand,cpu; configs=${CONFIGS:-$configs}
    python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs $configs --batches "$3" --tokens 8 \
      --prompt-len 32 --no-trace --out "$OUT/bench_$2_b${3//,/_}.json" 2>&1 | tail -12
    ;;
  arrivals)
    use_tree "${NEW_TREE:-.}" new
    # outputs 16-96 (run 4: 16-256 ran past 15 minutes); progress in arrivals.log as it goes; ARRIVALS_ARGS: more
    # arrivals.py options (--warmup trace: compile only the shapes the trace uses, not every bucket of its lengths)
    python3 bench/arrivals.py "$S" "${BUDGET[@]}" --requests 32 --rate 8 --prompt-len 32:512 --output-len 16:96 \
      --static-batch 32 --static-prompt 32 --static-tokens 8 ${ARRIVALS_ARGS:-} ${2:+--set "$2"} --out "$OUT/arrivals${2:+_$2}.json" 2>&1 \
      | tee "$OUT/arrivals${2:+_$2}.log" | tail -8
    ;;
  serve)
    use_tree "${NEW_TREE:-.}" new
    # .whl/: the serve extra's wheels, no deps resolved there (the device has no index): fastapi uvicorn starlette h11
    # anyio sniffio click typing-inspection annotated-types annotated-doc pydantic pydantic-core typing-extensions
    # opentelemetry-api (FastAPI >= 0.16x imports it), e.g. `pip download --no-deps --only-binary=:all:
    # --python-version 3.12 --platform manylinux2014_x86_64 -d .whl ...`
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl \
      && export PYTHONPATH="/tmp/site:$PYTHONPATH" || exit 1
    python3 -c "import fastapi, uvicorn, pydantic" || exit 1      # a missing wheel: stop before loading anything
    T=${3:+_$3}                          # a third argument: one more runtime option (KEY=VALUE), in the file names too
    python3 -m dsjax.cli serve "$S" "${BUDGET[@]}" --set max_batch_size=64 --max-queue 256 ${SERVE_ARGS:-} \
      ${3:+--set "$3"} > "$OUT/serve$T.log" 2>&1 &
    P=$!
    health='import urllib.request; urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2)'
    # /health answers 503 with the warm-up's progress until it ends: logged every ~60 s (a cut-off run keeps it)
    n=0
    until python3 -c "$health" 2> /dev/null; do
      kill -0 $P || { tail "$OUT/serve$T.log"; exit 1; }; sleep 2; n=$((n + 1))
      [ $((n % 30)) -eq 0 ] && echo "$(date +%T) $(curl -s http://127.0.0.1:8000/health)"
    done
    grep "warm-up done" "$OUT/serve$T.log"
    python3 bench/serve_load.py --concurrency "${2:-1,8,32,64}" ${LOAD_LENS:---prompt-len 32:512 --output-len 16:128} \
      --requests-per-stream 1 --out "$OUT/serve_load$T.json" 2>&1 | tail -12
    python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8000/metrics").read().decode())' \
      > "$OUT/metrics$T.txt"
    # wait for it to exit: its pinned host memory (~84 GB) is freed only then, and the next step's load needs it
    # (run 10: the bench right after it aborted while loading, most likely for this)
    kill $P; wait $P
    ;;
  all)
    # STEPS: ;-separated steps (default: every one, most wanted first)
    IFS=';' read -ra steps <<< "${STEPS:-setup;cpu;bench NEW 1,32;bench OLD 1,32;arrivals;serve 1,8,32,64;bench NEW 8;bench OLD 8}"
    for step in "${steps[@]}"; do
      echo "=== $step $(date +%T)"; bash "$ROOT/bench/request_engine_gpu.sh" $step
    done
    echo "=== done $(date +%T) (persistent compile cache: $(du -sh /tmp/xla-new 2> /dev/null | cut -f1))"
    ;;
  copies)              # bench/copy_paths.py: the engine thread's time per expert copy, by path
    use_tree "${NEW_TREE:-.}" new
    (cd /tmp && python3 "$ROOT/${NEW_TREE:-.}/bench/copy_paths.py" --experts 1,6,16 --reps 20 --out "$OUT/copy_paths.json" 2>&1 | tail -28)
    ;;
  copyjit)             # b1 with a layer's misses copied inside the slot write (compute_config.expert_copy=jit)
    use_tree "${NEW_TREE:-.}" new
    python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs on_demand,budget --batches 1 --tokens 8 --prompt-len 32 \
      --no-trace --set expert_copy=jit --out "$OUT/bench_copyjit_b1.json" 2>&1 | tail -6
    ;;
  nopred)              # b1: budget with no predictions at all (prefetch_layers 0: attention without the next layers'
    use_tree "${NEW_TREE:-.}" new    # routers) beside on_demand, one process: is the budget engine's no-copy-ahead step
    python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs budget,on_demand --batches 1 --tokens 8 --prompt-len 32 \
      --no-trace --set prefetch_layers=0 --set disk_prefetch_layers=0 --out "$OUT/bench_nopred_b1.json" 2>&1 | tail -6   # slower than on_demand's?
    ;;
  cpuod)               # b1: loading on demand with and without host-resident experts computed on the CPU (issue 24:
    use_tree "${NEW_TREE:-.}" new    # the cpu config is built on budget; on_demand is the best GPU-only config)
    python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs on_demand,cpu --batches 1,8 --tokens 8 --prompt-len 32 \
      --no-trace --set overlap_io=false --out "$OUT/bench_cpu_on_demand_b1_8.json" 2>&1 | tail -6
    ;;
  cpuauto)             # b1, b8: on_demand, the CPU path forced on, and under auto (the CPU trial decides per bucket);
    # a 40-token warm-up lets the trial reach its verdict before the measured 16; `cpuauto OLD`: the tree in .old/;
    # OMP_WAIT_POLICY=passive (in the environment) parks numba's OpenMP threads at once after each kernel call
    # instead of letting them spin a while (the default), tagged in the file names
    if [ "${2:-}" = OLD ]; then use_tree .old old; else use_tree "${NEW_TREE:-.}" new; fi
    tag=${2:+_$2}${OMP_WAIT_POLICY:+_omp_$OMP_WAIT_POLICY}
    python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs on_demand,cpu,cpu_auto --batches 1,8 --tokens 16 \
      --warmup-tokens 40 --prompt-len 32 --no-trace --set overlap_io=false --out "$OUT/bench_cpu_auto${tag}_b1_8.json" \
      2>&1 | tee "$OUT/cpuauto$tag.log" | tail -9
    ;;
  warmthreads)         # Engine.warmup with 0 and 8 compile threads (fresh processes, no compile cache), then b1 decode
    use_tree "${NEW_TREE:-.}" new
    python3 bench/warmup_threads.py "$S" "${BUDGET[@]}" --threads "${2:-0,8}" --out "$OUT/warmup_threads.json" 2>&1 | tail -7
    ;;
  pinlimit)            # process RSS with the pinned host pool capped near what the plan pins: dsjax's default now
    use_tree "${NEW_TREE:-.}" new    # (the plan's pinned bytes + 10% + 2 GiB; the slice at 16/96 GB: 37.2 GiB -> 43)
    # against a limit of GiB (default: 90% of RAM, the limit before that cap); XLA's BFC pool grows by doubling
    old=$(python3 -c "import os; print(int(0.9 * os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30))")
    for lim in default "${2:-$old}"; do    # regions up to XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB; one process each: RSS
      # (peak) and tok/s are columns of the table; a cap too low fails the load with Out of host memory
      pre=(); [ "$lim" = default ] || pre=("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=$lim")
      env "${pre[@]}" python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs on_demand --batches 1 --tokens 8 --prompt-len 32 \
        --no-trace --out "$OUT/bench_pinlimit_$lim.json" 2>&1 | tail -3
    done
    ;;
  allocator)           # how much of the card a JAX process can allocate, by allocator setting (bench/gpu_allocator_limit.py)
    use_tree "${NEW_TREE:-.}" new
    python3 bench/gpu_allocator_limit.py --out "$OUT/allocator.json" 2>&1 | tail -6
    ;;
  longprefill)         # one 4,000-token prompt at batch 1: its prefill runs attention in query blocks (SCORE_BLOCK_BYTES)
    use_tree "${NEW_TREE:-.}" new
    python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs on_demand --batches 1 --tokens 2 --prompt-len 4000 \
      --no-trace --out "$OUT/bench_prefill4000_b1.json" 2>&1 | tail -3
    ;;
  hbm)                 # the whole slice in HBM at batch 1 (issue 20, item 4)
    use_tree "${NEW_TREE:-.}" new
    python3 -m dsjax.cli bench "$S" --configs hbm --batches 1 --tokens 16 --prompt-len 32 --no-trace \
      --out "$OUT/bench_hbm_b1.json" 2>&1 | tail -5
    ;;
  hot)                 # popularity from 8 x 64 tokens of random prompts, then bench b1 with a GPU-resident hot set
    use_tree "${NEW_TREE:-.}" new
    python3 -c "import dsjax, numpy as np; e = dsjax.load('$S', gpu_memory='16GB', host_memory='96GB'); \
r = np.random.default_rng(0); e.generate([[int(t) for t in r.integers(100, 20000, 32)] for _ in range(8)], \
max_new_tokens=64); e.save_popularity('$OUT/pop.json'); e.close()" 2>&1 | tail -2
    python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs on_demand,budget --batches 1 --tokens 8 --prompt-len 32 \
      --no-trace --set hot_experts="${2:-8}" --set popularity="$OUT/pop.json" --out "$OUT/bench_hot_b1.json" 2>&1 | tail -8
    ;;
  options)             # fewer active experts at batch 1
    use_tree "${NEW_TREE:-.}" new
    for k in 6 4; do
      python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs on_demand,budget --batches 1 --tokens 8 --prompt-len 32 \
        --no-trace --set active_experts=$k --out "$OUT/bench_k${k}_b1.json" 2>&1 | tail -5
    done
    ;;
  multi)               # tiered expert parallelism on a multi-GPU kind: N GPUs against one, same run (issue 22)
    use_tree "${NEW_TREE:-.}" new
    n=${2:-2}
    python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --configs budget,on_demand --batches 8,32 --tokens 8 --prompt-len 32 \
      --no-trace --out "$OUT/bench_1gpu_b8_32.json" 2>&1 | tail -5
    python3 -m dsjax.cli bench "$S" "${BUDGET[@]}" --devices "$n" --configs budget,on_demand --batches 8,32 --tokens 8 \
      --prompt-len 32 --no-trace --out "$OUT/bench_${n}gpu_b8_32.json" 2>&1 | tail -16
    ;;
  gaps)                # a running stream's stall when a request joins, compile ahead on and off (session 14)
    use_tree "${NEW_TREE:-.}" new
    python3 bench/join_gaps.py "$S" "${BUDGET[@]}" --out "$OUT/join_gaps.json" 2>&1 | tail -4
    ;;
  cpu)                 # the CPU expert kernel alone (tests, then GB/s by threads and rows, fixed cost, GIL lines);
    # `cpu OLD`: the tree in .old/ (e.g. `git archive 5271fb8 dsjax kernels configs bench`: its pool of Python threads,
    # before session 24's single numba parallel call), the same bench script run from there
    if [ "${2:-}" = OLD ]; then use_tree .old old
    else use_tree "${NEW_TREE:-.}" new; python3 -m pytest -q -p no:cacheprovider tests/test_cpu_experts.py 2>&1 | tail -2; fi
    python3 bench/cpu_experts_bench.py --out "$OUT/cpu_experts${2:+_$2}.json" 2>&1 | tail -30
    ;;
  *) echo "usage: $0 setup | slice | gputests | bench NEW|OLD BATCHES | arrivals | serve [CONCURRENCY] | hot [N] | options | nopred | cpuod | cpuauto [OLD] | warmthreads [T,T] | hbm | copies | copyjit | gaps | multi [N] | cpu [OLD] | pinlimit [GB] | all"; exit 2 ;;
esac

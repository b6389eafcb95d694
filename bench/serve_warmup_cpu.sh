#!/usr/bin/env bash
# The server's warm-up on the embedded model, CPU backend (bench/RESULTS.md "Server warm-up"): the same load on a
# server without warm-up and on one warmed for prompts <= 64 and outputs <= 16 tokens; persistent compile cache off.
#   bash bench/serve_warmup_cpu.sh [PYTHON]        (default .venv/bin/python; port 8012)
set -u
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=${OUT:-/tmp/serve_warmup_cpu}; mkdir -p "$OUT"
for W in 0 64; do
  JAX_PLATFORMS=cpu DSJAX_COMPILE_CACHE=off "$PY" -m dsjax.cli serve --port 8012 --warmup-prompt $W --warmup-tokens 16 \
    --set max_batch_size=4 > "$OUT/serve_$W.log" 2>&1 &
  P=$!
  health='import urllib.request; urllib.request.urlopen("http://127.0.0.1:8012/health", timeout=2)'
  until "$PY" -c "$health" 2> /dev/null; do kill -0 $P || { tail "$OUT/serve_$W.log"; exit 1; }; sleep 2; done
  echo "== --warmup-prompt $W"; grep "warm-up done" "$OUT/serve_$W.log"
  "$PY" bench/serve_load.py --url http://127.0.0.1:8012 --concurrency 1,4 --prompt-len 8:64 --output-len 4:16 \
    --requests-per-stream 2 --warmup 0 --out "$OUT/load_$W.json" 2>&1 | tail -4
  kill $P; wait $P 2> /dev/null
done

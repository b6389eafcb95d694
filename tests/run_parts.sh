#!/usr/bin/env bash
# `make test`: the CPU suite in several pytest processes run side by side (see DEVELOPERS.md, "the test suite in
# three processes"). Each part's output is kept in a file and printed whole when the part ends, in the order parts
# end; the exit code is the first failing part's in argument order (pytest's 5, nothing collected, included: .ci/run
# judges it). TEST_JOBS=1 runs the parts one after another; by default as many at once as there are parts.
# TEST_DURATIONS=N: pytest lists the N slowest tests of each part (default 10).
#   tests/run_parts.sh PYTHON "PART" "PART" ...      (a PART is a space-separated list of pytest paths)
set -u
py=$1; shift
jobs=${TEST_JOBS:-$#}
logs=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$logs"' EXIT
# One persistent compilation cache for every part of this run (unless the developer named one): a program one part
# compiled is read back by another instead of compiled again (conftest.py otherwise gives each process its own). A
# part that reads an entry another is still writing gets JAX's warning and compiles it itself.
if [ -z "${DSJAX_COMPILE_CACHE:-}" ]; then export DSJAX_COMPILE_CACHE="$logs/xla"; fi
start=$(date +%s)
run_part() {          # $1: index, $2: the part's paths
  local t0=$(date +%s)
  # shellcheck disable=SC2086
  "$py" -m pytest -q -m "not gpu and not slow" --durations=${TEST_DURATIONS:-10} $2 > "$logs/$1.log" 2>&1
  local rc=$?
  echo "$rc" > "$logs/$1.rc"
  { echo "== pytest part $1 ($2): exit $rc after $(( $(date +%s) - t0 )) s"; cat "$logs/$1.log"; } > "$logs/$1.out"
  cat "$logs/$1.out"
}
i=0
for part in "$@"; do
  i=$((i + 1))
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  run_part "$i" "$part" &
done
wait
rc=0
for j in $(seq 1 "$i"); do
  r=$(cat "$logs/$j.rc" 2>/dev/null || echo 1)
  if [ "$r" -ne 0 ] && [ "$rc" -eq 0 ]; then rc=$r; fi
done
echo "== $i pytest parts, $jobs at a time: exit $rc after $(( $(date +%s) - start )) s"
exit "$rc"

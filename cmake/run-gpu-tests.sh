#!/usr/bin/env bash
# Runs every test binary of this bundle (GPU tests and CPU tests alike) and writes one log and one
# gtest XML per binary plus summary.txt. Usage: run-gpu-tests.sh [out_dir] (default: $OUT, else
# ./test-results). TEST_FILTER=<glob> limits the binaries (e.g. TEST_FILTER="cuda_*"); TEST_TIMEOUT
# (seconds, default 300) bounds each binary.
# Exit status: 0 when every binary passed, 1 otherwise.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="${1:-${OUT:-$PWD/test-results}}"
FILTER="${TEST_FILTER:-*}"
mkdir -p "$OUT_DIR"
# shellcheck source=/dev/null
. "$HERE/env.sh"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "gpu: none"
} > "$OUT_DIR/summary.txt"

fails=0
printf '%-36s %6s %6s %6s %6s %8s\n' binary rc passed failed skipped seconds >> "$OUT_DIR/summary.txt"
for t in "$HERE"/bin/*_test; do
  name="$(basename "$t")"
  # shellcheck disable=SC2053
  [[ "$name" == $FILTER ]] || continue
  start=$(date +%s)
  timeout "${TEST_TIMEOUT:-300}" "$t" --gtest_output="xml:$OUT_DIR/$name.xml" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  passed=$(grep -oP '\[  PASSED  \] \K[0-9]+' "$OUT_DIR/$name.log" | tail -1)
  failed=$(grep -oP '\[  FAILED  \] \K[0-9]+(?= tests?, listed)' "$OUT_DIR/$name.log" | tail -1)
  skipped=$(grep -oP '\[  SKIPPED \] \K[0-9]+(?= tests?, listed)' "$OUT_DIR/$name.log" | tail -1)
  [ "$rc" -ne 0 ] && fails=$((fails + 1))
  printf '%-36s %6s %6s %6s %6s %8s\n' "$name" "$rc" "${passed:-0}" "${failed:-0}" "${skipped:-0}" "$secs" \
    >> "$OUT_DIR/summary.txt"
  if [ "$rc" -ne 0 ]; then
    grep -E '^\[  FAILED  \]|Failure|error' "$OUT_DIR/$name.log" | head -20 > "$OUT_DIR/$name.failures"
  fi
done
echo "binaries failed: $fails" >> "$OUT_DIR/summary.txt"
cat "$OUT_DIR/summary.txt"
for f in "$OUT_DIR"/*.failures; do
  [ -e "$f" ] && { echo "== $(basename "$f")"; cat "$f"; }
done
[ "$fails" -eq 0 ]

#!/usr/bin/env bash
# Probe: stories260K decode speed with --threads 1 and the default thread count, alone and beside two
# busy-loop processes (other work sharing the cores), for one or more specontext binaries (a build
# before a change and after it). Configurations alternate within each round, so drift in the load of a
# shared machine hits them alike; prints the median, min and max tokens/s of each over ROUNDS rounds.
# usage: bench/probes/cpu_contention.sh ROUNDS SPECONTEXT_BINARY...   (from the repository root;
#        MODEL and TOKENS in the environment pick another model and the tokens generated per run)
set -euo pipefail
rounds=${1:?rounds}
shift
model=${MODEL:-models/stories260K/stories260K.bin}
tokens=${TOKENS:-511}
results=$(mktemp)
busy_pids=()
stop_busy() {
  for pid in "${busy_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  busy_pids=()
}
trap 'stop_busy; rm -f "$results"' EXIT

run_once() {  # binary threads load
  local tps
  tps=$(timeout 120 "$1" generate --model "$model" --max-new-tokens "$tokens" --threads "$2" 2>&1 >/dev/null |
        sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p') || true
  echo "$1 $3 $2 ${tps:-0}" >>"$results"
}

for load in alone busy2; do
  if [[ $load == busy2 ]]; then
    for _ in 1 2; do
      bash -c 'while :; do :; done' &
      busy_pids+=($!)
    done
    sleep 1
  fi
  for ((r = 0; r < rounds; ++r)); do
    for bin in "$@"; do
      for threads in 1 0; do run_once "$bin" "$threads" "$load"; done
    done
  done
  stop_busy
done

python3 - "$results" "$rounds" <<'PY'
import collections, os, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    binary, load, threads, tps = line.split()
    runs[(binary, load, int(threads))].append(float(tps))
print(f"tokens/s over {sys.argv[2]} runs, {os.cpu_count()} CPUs; threads 0 = the default")
print(f"{'binary':40} {'load':6} {'threads':>7} {'median':>8} {'min':>8} {'max':>8}")
for (binary, load, threads), v in sorted(runs.items()):
    print(f"{binary:40} {load:6} {threads:7d} {statistics.median(v):8.0f} {min(v):8.0f} {max(v):8.0f}")
PY

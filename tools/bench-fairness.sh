#!/bin/sh
# Short-request latency behind another client's flood (docs/services.md "Limits and hardening").
# One client (IPv4 loopback) sends FLOOD long requests at once; when the generator's queue holds them,
# another client (IPv6 loopback: another peer) sends one 16-token request, timed end to end.
#
#   tools/bench-fairness.sh BIN_DIR [generator flags...]
#     BIN_DIR: where specontext-generator, specontext-loadgen and specontext-client are (build-cpu/bin)
#   env: FLOOD (64), LONG_TOKENS (480), MODEL_DIR (models/stories260K)
set -eu
bin=$1; shift
flood=${FLOOD:-64}
long=${LONG_TOKENS:-480}
model=${MODEL_DIR:-models/stories260K}
work=$(mktemp -d)
trap 'kill $gen_pid $load_pid 2>/dev/null || true; rm -rf "$work"' EXIT
gen_pid=""; load_pid=""
"$bin/specontext-generator" --model "$model/stories260K.bin" --tokenizer "$model/tok512.bin" --backend cpu \
  --listen '[::]:0' --metrics-port 0 --metrics-host 127.0.0.1 --port-file "$work/ports" --log-level warning \
  "$@" >"$work/gen.log" 2>&1 &
gen_pid=$!
while [ ! -s "$work/ports" ]; do sleep 0.05; done
read -r port metrics <"$work/ports"
alone_start=$(date +%s.%N)
"$bin/specontext-client" generate --addr "[::1]:$port" --prompt "Once upon a time" --max-new-tokens 16 \
  --ignore-eos >/dev/null
alone=$(echo "$(date +%s.%N) - $alone_start" | bc)
"$bin/specontext-loadgen" --addr "127.0.0.1:$port" --concurrency "$flood" --requests "$flood" \
  --max-new-tokens "$long" --ignore-eos >"$work/load.txt" 2>&1 &
load_pid=$!
# Wait until the flood is queued (or running, when the batch takes it all).
while :; do
  q=$(curl -s "http://127.0.0.1:$metrics/metrics" | awk '/^spc_generator_queue_depth /{print $2}')
  r=$(curl -s "http://127.0.0.1:$metrics/metrics" | awk '/^spc_generator_running_sequences /{print $2}')
  [ "$(echo "${q:-0} + ${r:-0} >= $flood - 1" | bc)" = 1 ] && break
  sleep 0.02
done
start=$(date +%s.%N)
"$bin/specontext-client" generate --addr "[::1]:$port" --prompt "Once upon a time" --max-new-tokens 16 \
  --ignore-eos >/dev/null
behind=$(echo "$(date +%s.%N) - $start" | bc)
wait $load_pid || true
flood_total=$(echo "$(date +%s.%N) - $start" | bc)
load_pid=""
printf 'short request alone: %.2f s; behind %d x %d-token requests of another client: %.2f s (the flood took %.2f s more)\n' \
  "$alone" "$flood" "$long" "$behind" "$flood_total"

# Shell functions to start and stop the services inside one device call (sourced by bench/gpu_serve.sh).
# Every server writes its ports to a port file; spc_start waits for it, so a failed start is seen at once.

SPC_PIDS=()

# spc_start NAME LOG_DIR BINARY ARGS...: starts BINARY with --port-file, waits until it serves (up to
# SPC_START_TIMEOUT seconds, default 240: an 8B checkpoint loads in about 30 s). Sets SPC_PORT (gRPC) and
# SPC_METRICS_PORT, and SPC_PID; returns 1 with the log's tail when it exits or times out first.
spc_start() {
  local name=$1 logs=$2 bin=$3; shift 3
  local pf="$logs/$name.port"
  rm -f "$pf"
  "$bin" "$@" --port-file "$pf" > "$logs/$name.log" 2>&1 &
  SPC_PID=$!
  SPC_PIDS+=("$SPC_PID")
  local waited=0
  while [ ! -s "$pf" ]; do
    if ! kill -0 "$SPC_PID" 2> /dev/null; then
      echo "$name exited before serving:"; tail -5 "$logs/$name.log"; return 1
    fi
    if [ "$waited" -ge "${SPC_START_TIMEOUT:-240}" ]; then
      echo "$name did not serve within ${SPC_START_TIMEOUT:-240} s:"; tail -5 "$logs/$name.log"; return 1
    fi
    sleep 0.5; waited=$((waited + 1))
  done
  read -r SPC_PORT SPC_METRICS_PORT < "$pf"
}

# spc_stop PID [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 20); prints how it ended.
spc_stop() {
  local pid=$1 secs=${2:-20} i=0
  kill -TERM "$pid" 2> /dev/null || return 0
  while kill -0 "$pid" 2> /dev/null && [ $i -lt $((secs * 2)) ]; do sleep 0.5; i=$((i + 1)); done
  if kill -0 "$pid" 2> /dev/null; then echo "pid $pid ignored SIGTERM for ${secs} s: killed"; kill -KILL "$pid"; fi
  wait "$pid" 2> /dev/null
}

spc_stop_all() {
  local p
  for p in "${SPC_PIDS[@]}"; do spc_stop "$p" 10; done
  SPC_PIDS=()
}

# spc_scrape PORT FILE: the /metrics text of a server.
spc_scrape() {
  python3 - "$1" "$2" << 'EOF'
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10) as r:
    open(sys.argv[2], "wb").write(r.read())
EOF
}

#!/usr/bin/env bash
# The services on the GPU machine, within one device call: start the generator (and a retriever), wait until
# they serve, drive them, scrape /metrics, stop everything. docs/gpu.md "Services on the GPU".
# Usage: bench/gpu_serve.sh BUNDLE_DIR OUT_DIR PARTS   PARTS: comma list of
#   equal     greedy text of the service on CUDA == `specontext generate` on CUDA, for stories260K and a tiny
#             random GQA checkpoint: dense, sparse in-process, sparse with a separate retriever; then 32
#             concurrent streams == their single-stream runs (equal.txt). SPC_EQUAL_BATCH_INVARIANT=1 runs the
#             generator and the CLI with --batch-invariant (docs/gpu.md "Batch-invariant decoding"); equal.txt
#             says which mode each line ran in. The separate retriever of tiny-split has no such mode.
#   kvstore   generator with --kvstore on CUDA (segment registered with CUDA): requests served from the host
#             tier, SIGKILL mid-stream, restart on the same segment, every block reclaimed (kvstore.txt)
#   serve     serving figures with specontext-loadgen on a random Llama-3.1-8B shape (SPC_SERVE_PRESET; or a
#             real model: SPC_SERVE_MODEL=FILE.gguf SPC_SERVE_HEAD=models/smollm2-135m-retrieval-head):
#             dense and sparse (B 2048), concurrency 1, 8, 32 and two Poisson request rates
#             (SPC_SERVE_RATES, default "2,8"), /metrics scraped before and after each server (serve_*.jsonl)
#   paper     the paper's benchmark 3 served end to end: SPC_PAPER_REQUESTS (32) requests of a 2K prompt
#             generating SPC_PAPER_NEW (16384) tokens each, sparse B 2048, wall-clock output tokens/s
#   paper-dense  the same served densely at SPC_PAPER_DENSE_REQUESTS (12): the largest count that fits
#   split     sparse at concurrency 32 with the retriever in-process vs as a separate process: step time
#             and fallback rate under load (SPC_SPLIT_MODES, default "inproc split"; "dense" adds our dense
#             engine at the same load; the separate retriever runs the head on SPC_RETRIEVER_BACKEND,
#             default cpu: cuda puts it on the same GPU)
#   kvstore-8b  the kvstore host tier with layers really offloaded, on the served 8B shape: a
#             --gpu-memory-limit computed from a calibration start makes the planner move layers to host;
#             16 streams of 2K prompts x 512 out with --kvstore and with the pinned host tier (out tok/s,
#             TPOT, the tier gauges sampled during the run), then SIGKILL with 8 streams in flight, restart
#             on the same segment, inspect before/after, one greedy request's text before == after
#             (kvstore_8b.txt; SPC_KV8B_{STREAMS,PROMPT,OUT,BUDGET,HEADROOM,BLOCK_BYTES,KILL_OUT}; the segment
#             and the load follow `df /dev/shm`)
# Environment: SPC_SERVE_SECONDS caps each loadgen run (default 90); SPC_BACKEND=cpu smoke-tests the script
# (with SPC_SERVE_PRESET=tiny-llama for the parts that serve the 8B shape).
set -u
BUNDLE=$(cd "$1" && pwd); OUT=$2; PARTS=${3:-equal}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"; LOGS="$OUT/logs"; mkdir -p "$LOGS"
. "$BUNDLE/env.sh"
. "$HERE/lib/services.sh"
. "$HERE/lib/models.sh"
trap spc_stop_all EXIT
has() { [[ ",$PARTS," == *",$1,"* ]]; }
W=/tmp/spc-serve; mkdir -p $W
BACKEND=${SPC_BACKEND:-cuda}  # cpu: a smoke run of this script on the build machine
STORIES="$BUNDLE/models/stories260K/stories260K.bin"
STOK="--tokenizer $BUNDLE/models/stories260K/tok512.bin"

# ---- models ---------------------------------------------------------------------------------------------
tiny_models() {
  if [ ! -e $W/tiny/config.json ]; then
    specontext-random-checkpoint --preset tiny-llama-tied-gqa --dtype f32 --seed 5 --out $W/tiny > /dev/null 2>&1
    specontext prune --source $W/tiny --kind layer --target $W/tiny --out $W/tiny-head 2>&1 | tail -1
  fi
}

# The served model: a random checkpoint of SPC_SERVE_PRESET with its pruned random head, or a real one
# (SPC_SERVE_MODEL, e.g. the SmolLM2-135M GGUF, with SPC_SERVE_HEAD, e.g. models/smollm2-135m-retrieval-head).
PRESET=${SPC_SERVE_PRESET:-llama-3.1-8b}
MODEL=${SPC_SERVE_MODEL:-/tmp/$PRESET}
HEAD=${SPC_SERVE_HEAD:-/tmp/$PRESET-head}
served_model() { [ -n "${SPC_SERVE_MODEL:-}" ] || spc_model $PRESET; }

# ---- equal ----------------------------------------------------------------------------------------------
EQUAL_BI=""; EQUAL_MODE="batch-invariant off"
if [ "${SPC_EQUAL_BATCH_INVARIANT:-0}" = 1 ]; then EQUAL_BI="--batch-invariant"; EQUAL_MODE="batch-invariant on"; fi
PROMPTS=("Once upon a time" "The little dog ran to the" "Lily wanted to play with her friend" "One day, a big")
# compare_cli_service TAG MODEL GEN_ARGS SERVER_ARGS: each prompt through `specontext generate` and the
# service, texts compared; then every prompt 8 times at once (32 streams) against the single runs.
compare_cli_service() {
  local tag=$1 model=$2 gen_args=$3 server_args=$4 i=0 p same=0 diff=0
  spc_start gen-$tag $LOGS specontext-generator --model "$model" --backend $BACKEND --listen 127.0.0.1:0 \
    --metrics-port 0 $server_args $EQUAL_BI || return
  local gpid=$SPC_PID port=$SPC_PORT
  for p in "${PROMPTS[@]}"; do
    specontext generate --model "$model" --backend $BACKEND --prompt "$p" --max-new-tokens 96 --temperature 0 \
      $gen_args $EQUAL_BI > $W/$tag.cli.$i 2> $W/$tag.cli.$i.err
    specontext-client generate --addr 127.0.0.1:$port --prompt "$p" --max-new-tokens 96 --timeout-s 60 \
      > $W/$tag.svc.$i 2> $W/$tag.svc.$i.err
    if cmp -s $W/$tag.cli.$i $W/$tag.svc.$i; then same=$((same + 1)); else
      diff=$((diff + 1)); echo "  $tag prompt $i differs:"; echo "    cli: $(head -c 160 $W/$tag.cli.$i | tr '\n' ' ')"
      echo "    svc: $(head -c 160 $W/$tag.svc.$i | tr '\n' ' ')"; tail -1 $W/$tag.svc.$i.err | sed 's/^/    /'
    fi
    i=$((i + 1))
  done
  echo "$tag service vs cli ($EQUAL_MODE): $same equal, $diff differ"
  # 32 concurrent streams (8 per prompt) vs the single-stream service runs.
  local k j c_same=0 c_diff=0 clients=()
  for k in 0 1 2 3 4 5 6 7; do
    for j in 0 1 2 3; do
      specontext-client generate --addr 127.0.0.1:$port --prompt "${PROMPTS[$j]}" --max-new-tokens 96 \
        --timeout-s 120 > $W/$tag.conc.$k.$j 2> /dev/null &
      clients+=($!)
    done
  done
  wait "${clients[@]}"
  for k in 0 1 2 3 4 5 6 7; do
    for j in 0 1 2 3; do
      if cmp -s $W/$tag.conc.$k.$j $W/$tag.svc.$j; then c_same=$((c_same + 1)); else
        c_diff=$((c_diff + 1))
        # The first two differences in full, with where they part (a late near-tie or garbage from the start).
        if [ $c_diff -le 2 ]; then
          echo "  $tag stream $k prompt $j differs from its single run at byte $(cmp $W/$tag.conc.$k.$j $W/$tag.svc.$j \
            | awk '{print $5}' | tr -d ,):"
          echo "    single: $(head -c 400 $W/$tag.svc.$j | tr '\n' ' ')"
          echo "    stream: $(head -c 400 $W/$tag.conc.$k.$j | tr '\n' ' ')"
        fi
      fi
    done
  done
  echo "$tag 32 concurrent vs single ($EQUAL_MODE): $c_same equal, $c_diff differ"
  spc_stop $gpid
}
if has equal; then
  tiny_models
  {
    echo "equal: $EQUAL_MODE (SPC_EQUAL_BATCH_INVARIANT=${SPC_EQUAL_BATCH_INVARIANT:-0})"
    compare_cli_service stories-dense "$STORIES" "$STOK" "$STOK"
    # stories260K is a llama2.c checkpoint (no layer head to prune): each layer's own top-B (oracle).
    compare_cli_service stories-oracle "$STORIES" "$STOK --sparse --selection-source oracle --budget 16" \
      "$STOK --selection-source oracle --retriever inproc --budget 16"
    compare_cli_service tiny-dense $W/tiny "" ""
    compare_cli_service tiny-sparse $W/tiny "--sparse --retrieval-head $W/tiny-head --budget 8" \
      "--retrieval-head $W/tiny-head --retriever inproc --budget 8"
    if spc_start retriever-tiny $LOGS specontext-retriever --head $W/tiny-head --model $W/tiny \
        --listen 127.0.0.1:0 --metrics-port 0; then
      RETRIEVER_PID=$SPC_PID  # compare_cli_service's generator start overwrites SPC_PID
      compare_cli_service tiny-split $W/tiny "--sparse --retrieval-head $W/tiny-head --budget 8" \
        "--retrieval-head $W/tiny-head --retriever 127.0.0.1:$SPC_PORT --budget 8"
      spc_stop $RETRIEVER_PID
    fi
    if [ -n "${SPC_SERVE_MODEL:-}" ]; then  # a real model (e.g. SmolLM2-135M) and its trained head
      compare_cli_service real-dense "$SPC_SERVE_MODEL" "" ""
      compare_cli_service real-sparse "$SPC_SERVE_MODEL" "--sparse --retrieval-head $HEAD --budget 64" \
        "--retrieval-head $HEAD --retriever inproc --budget 64"
    fi
  } 2>&1 | tee "$OUT/equal.txt"
fi

# ---- kvstore --------------------------------------------------------------------------------------------
if has kvstore; then
  tiny_models
  {
    name=spc-gpu-$$
    specontext-kvstore remove --name $name > /dev/null 2>&1
    args="--model $W/tiny --backend $BACKEND --listen 127.0.0.1:0 --metrics-port 0 --retrieval-head $W/tiny-head
      --retriever inproc --budget 8 --kvstore $name --kvstore-blocks 2048 --kvstore-block-bytes 16KiB"
    if spc_start gen-kv $LOGS specontext-generator $args; then
      grep -i "kvstore\|register" $LOGS/gen-kv.log | head -5
      specontext-client generate --addr 127.0.0.1:$SPC_PORT --prompt "${PROMPTS[0]}" --max-new-tokens 96 \
        > $W/kv.svc 2> /dev/null
      specontext generate --model $W/tiny --backend $BACKEND --prompt "${PROMPTS[0]}" --max-new-tokens 96 \
        --temperature 0 --sparse --retrieval-head $W/tiny-head --budget 8 > $W/kv.cli 2> /dev/null
      cmp -s $W/kv.svc $W/kv.cli && echo "kvstore tier: service text == cli" || echo "kvstore tier: texts differ"
      spc_scrape $SPC_METRICS_PORT $OUT/kvstore_metrics.txt
      grep -E "^spc_kvstore_(used_blocks|host_tier_bytes|host_tier_fallbacks_total)" $OUT/kvstore_metrics.txt
      clients=()
      for i in 1 2 3 4 5 6 7 8; do
        specontext-client generate --addr 127.0.0.1:$SPC_PORT --prompt "${PROMPTS[1]}" --max-new-tokens 2000 \
          --ignore-eos > /dev/null 2>&1 &
        clients+=($!)
      done
      sleep 3
      specontext-kvstore inspect --name $name | head -12
      echo "SIGKILL the generator mid-stream"; kill -KILL $SPC_PID; wait $SPC_PID 2> /dev/null
      wait "${clients[@]}"
      specontext-kvstore inspect --name $name | grep -E "used_blocks|owners|sequences"
      if spc_start gen-kv2 $LOGS specontext-generator $args; then
        grep -i "reclaim" $LOGS/gen-kv2.log | head -3
        specontext-kvstore inspect --name $name | grep -E "used_blocks|owners|sequences"
        specontext-client generate --addr 127.0.0.1:$SPC_PORT --prompt "${PROMPTS[0]}" --max-new-tokens 96 \
          > $W/kv.svc2 2> /dev/null
        cmp -s $W/kv.svc2 $W/kv.cli && echo "after restart: service text == cli" || echo "after restart: differ"
        spc_stop $SPC_PID
      fi
    fi
    specontext-kvstore remove --name $name > /dev/null 2>&1
  } 2>&1 | tee "$OUT/kvstore.txt"
fi

# ---- serving figures ------------------------------------------------------------------------------------
# loadgen TAG PORT ARGS...: one loadgen run, JSONL in OUT/serve_TAG.jsonl, summary line on stdout.
loadgen() {
  local tag=$1 port=$2; shift 2
  timeout $((${SPC_SERVE_SECONDS:-90} + 60)) specontext-loadgen --addr 127.0.0.1:$port --quiet --timeout-s $((${SPC_SERVE_SECONDS:-90} + 30)) \
    --duration-s ${SPC_SERVE_SECONDS:-90} --out "$OUT/serve_$tag.jsonl" "$@" > "$LOGS/loadgen_$tag.txt" 2>&1
  local rc=$?
  python3 - "$tag" "$rc" "$OUT/serve_$tag.jsonl" << 'EOF'
import json, sys
tag, rc, path = sys.argv[1:4]
try:
    s = next(j for j in map(json.loads, open(path)) if j.get("type") == "summary")
except (OSError, StopIteration, ValueError):
    print(f"{tag} rc={rc} no summary"); sys.exit()
print(f"{tag} rc={rc} ok={s['completed']} failed={s['failed']} req/s={s['request_throughput']:.2f} "
      f"out_tok/s={s['output_throughput']:.1f} ttft_ms p50={s['median_ttft_ms']:.1f} p99={s['p99_ttft_ms']:.1f} "
      f"tpot_ms p50={s['median_tpot_ms']:.2f} p99={s['p99_tpot_ms']:.2f} itl_ms p99={s['p99_itl_ms']:.2f}")
EOF
}
serve_model() {  # serve_model TAG SERVER_ARGS...: starts the generator on the served model, scrapes /metrics
  local tag=$1; shift
  spc_start gen-$tag $LOGS specontext-generator --model "$MODEL" --backend $BACKEND --listen 127.0.0.1:0 \
    --metrics-port 0 "$@" || return 1
  spc_scrape $SPC_METRICS_PORT "$OUT/metrics_${tag}_before.txt"
}
# metrics_vs_client TAG LOADGEN_FILES...: the server's /metrics deltas beside the client's own figures.
metrics_vs_client() {
  local tag=$1; shift
  python3 "$HERE/lib/metrics_vs_client.py" "$OUT/metrics_${tag}_before.txt" "$OUT/metrics_${tag}_after.txt" "$@" \
    | tee "$OUT/metrics_vs_client_$tag.json"
}
if has serve; then
  served_model
  for mode in dense sparse; do
    if [ $mode = sparse ]; then
      serve_model $mode --retrieval-head $HEAD --retriever inproc --budget 2048 || continue
    else
      serve_model $mode || continue
    fi
    for c in 1 8 32; do
      loadgen ${mode}_c$c $SPC_PORT --concurrency $c --requests $((c * 4)) --prompt-tokens 2048 \
        --output-tokens 256 --warmup-requests 1
    done
    for r in $(echo ${SPC_SERVE_RATES:-2,8} | tr , ' '); do
      loadgen ${mode}_rate$r $SPC_PORT --request-rate $r --requests $((r * 20)) --max-concurrency 64 \
        --prompt-tokens uniform:512:4096 --output-tokens uniform:64:512 --seed 1
    done
    spc_scrape $SPC_METRICS_PORT "$OUT/metrics_${mode}_after.txt"
    metrics_vs_client $mode "$OUT"/serve_${mode}_*.jsonl
    spc_stop $SPC_PID
  done
fi

# ---- the paper's benchmark 3, served ---------------------------------------------------------------------
if has paper || has paper-dense; then
  served_model
  NEW=${SPC_PAPER_NEW:-16384}
  if has paper; then
    R=${SPC_PAPER_REQUESTS:-32}
    if serve_model paper --retrieval-head $HEAD --retriever inproc --budget 2048 --max-batch $R \
        --max-context $((2048 + NEW)); then
      SPC_SERVE_SECONDS=${SPC_PAPER_SECONDS:-500} loadgen paper_sparse_r$R $SPC_PORT --concurrency $R \
        --requests $R --prompt-tokens 2048 --output-tokens $NEW
      spc_scrape $SPC_METRICS_PORT "$OUT/metrics_paper_after.txt"
      metrics_vs_client paper "$OUT/serve_paper_sparse_r$R.jsonl"
      spc_stop $SPC_PID
    fi
  fi
  if has paper-dense; then
    R=${SPC_PAPER_DENSE_REQUESTS:-12}
    if serve_model paper-dense --max-batch $R --max-context $((2048 + NEW)); then
      SPC_SERVE_SECONDS=${SPC_PAPER_SECONDS:-500} loadgen paper_dense_r$R $SPC_PORT --concurrency $R \
        --requests $R --prompt-tokens 2048 --output-tokens $NEW
      spc_scrape $SPC_METRICS_PORT "$OUT/metrics_paper-dense_after.txt"
      metrics_vs_client paper-dense "$OUT/serve_paper_dense_r$R.jsonl"
      spc_stop $SPC_PID
    fi
  fi
fi

# ---- split retriever vs in-process under load -------------------------------------------------------------
if has split; then
  served_model
  for where in ${SPC_SPLIT_MODES:-inproc split}; do
    if [ $where = split ]; then
      spc_start retriever-big $LOGS specontext-retriever --head $HEAD --model "$MODEL" \
        --backend ${SPC_RETRIEVER_BACKEND:-cpu} --listen 127.0.0.1:0 --metrics-port 0 || continue
      spc_scrape $SPC_METRICS_PORT "$OUT/metrics_retriever_before.txt"
      rport=$SPC_METRICS_PORT
      rpid=$SPC_PID; raddr=127.0.0.1:$SPC_PORT
    else
      raddr=inproc
    fi
    if [ $where = dense ]; then  # our dense engine at the same load, the baseline beside both
      serve_model split-dense || continue
    else
      serve_model split-$where --retrieval-head $HEAD --retriever $raddr --budget 2048 || continue
    fi
    loadgen split_${where}_c32 $SPC_PORT --concurrency 32 --requests 64 --prompt-tokens 2048 --output-tokens 512
    spc_scrape $SPC_METRICS_PORT "$OUT/metrics_split-${where}_after.txt"
    metrics_vs_client split-$where "$OUT/serve_split_${where}_c32.jsonl"
    spc_stop $SPC_PID
    if [ $where = split ]; then spc_scrape $rport "$OUT/metrics_retriever_after.txt"; spc_stop $rpid; fi
  done
fi

# ---- kvstore-8b: the kvstore host tier under load, with layers offloaded ---------------------------------
# The served 8B shape (SPC_SERVE_PRESET), sparse B 2048, with a --gpu-memory-limit that makes the memory
# planner offload layers near the end of the load: a calibration start (no limit) reads the bytes the planner
# counts as fixed (spc_device_memory_bytes at start), the limit adds the planner's per-step workspace bound
# and the KV of R streams at the end of their outputs with SPC_KV8B_HEADROOM (0.35) of the way from "every
# layer offloaded" (R x B slot rows a layer) to "every layer resident" (R x (P + O) rows a layer): about
# (1 - headroom) of the layers move to host over the last part of the outputs. (a) loadgen R x P prompt
# tokens x O out with the host tier in a kvstore segment, then with pinned host memory (same flags);
# (b) on the kvstore generator: one greedy request, 8 streams of longer prompts (so that layers move right
# after their prefill), SIGKILL, restart on the same segment, inspect before/after, the same greedy request.
kv8b_metric() {  # kv8b_metric FILE NAME: the value of an unlabelled metric (empty when absent)
  awk -v n="$2" '$1 == n { print $2 }' "$1" 2> /dev/null | head -1
}
kv8b_sample() {  # kv8b_sample PORT FILE: every 2 s a line of the tier gauges, until killed
  local t=0
  while :; do
    if spc_scrape "$1" $W/kv8b.sample.txt 2> /dev/null; then
      echo "t=${t}s $(grep -E "^spc_(kvstore_used_blocks|kvstore_host_tier_bytes|kvstore_host_tier_fallbacks_total|resident_layers|offloaded_layers|host_kv_bytes|generator_running_sequences) " $W/kv8b.sample.txt | tr '\n' ' ')"
    fi
    sleep 2; t=$((t + 2))
  done >> "$2"
}
kv8b_sample_summary() {  # kv8b_sample_summary FILE: maxima / minima over the samples
  awk '{ for (i = 2; i < NF; i += 2) { v = $(i + 1) + 0; if (!($i in mx) || v > mx[$i]) mx[$i] = v;
         if (!($i in mn) || v < mn[$i]) mn[$i] = v } }
       END { for (k in mx) printf "  %s: min %g max %g\n", k, mn[k], mx[k] }' "$1" | sort
}
kv8b_planner() {  # kv8b_planner LOG: what the memory planner did
  echo "  planner: $(grep -c 'layer moved to host' "$1") layer moves to host, $(grep -c 'moved back to the device' "$1") back; last: $(grep 'layer moved to host' "$1" | tail -1 | sed 's/.*msg=//')"
}
if has kvstore-8b; then
  served_model
  {
    if [ "$BACKEND" = cpu ]; then E=4; P=${SPC_KV8B_PROMPT:-256}; O=${SPC_KV8B_OUT:-64}; B=${SPC_KV8B_BUDGET:-64}
      BB=${SPC_KV8B_BLOCK_BYTES:-4096}; GREEDY_REPS=4
      EXTRA=""; OK=${SPC_KV8B_KILL_OUT:-1024}  # long enough to be killed mid-stream
    else EXTRA="" OK=${SPC_KV8B_KILL_OUT:-512} E=2; P=${SPC_KV8B_PROMPT:-2048}; O=${SPC_KV8B_OUT:-512}; B=${SPC_KV8B_BUDGET:-2048}
      BB=${SPC_KV8B_BLOCK_BYTES:-65536}; GREEDY_REPS=40
    fi
    R=${SPC_KV8B_STREAMS:-16}; KR=8; HROOM=${SPC_KV8B_HEADROOM:-0.35}
    # Model shape: layers, KV heads, head dim; the head's K/V.
    read -r L H D HID INTER QD KVD VOCAB HL HH HD < <(python3 - "$MODEL/config.json" "$HEAD/config.json" << 'PY'
import json, sys
c, h = (json.load(open(p)) for p in sys.argv[1:3])
hd = lambda x: x.get("head_dim") or x["hidden_size"] // x["num_attention_heads"]
print(c["num_hidden_layers"], c["num_key_value_heads"], hd(c), c["hidden_size"], c["intermediate_size"],
      c["num_attention_heads"] * hd(c), c["num_key_value_heads"] * hd(c), c["vocab_size"],
      h["num_hidden_layers"], h["num_key_value_heads"], hd(h))
PY
)
    K=$((2 * H * D * E))                  # KV bytes per token and layer
    RC=$((HL * 2 * HH * HD * E))          # retrieval head cache per token (K and V: an upper bound)
    CAP=$((P + O))
    # The kill test's prompts: long enough that 8 streams need layers on the host right after the prefill.
    X_OF() { python3 -c "r,L,k,B,cap,h,rc=$1,$L,$K,$B,$CAP,$HROOM,$RC; print(int(r*L*k*(B+h*(cap-B)) + r*cap*rc))"; }
    X=$(X_OF $R)
    PK=$(python3 -c "import math; print(max($P, math.ceil(1.3 * $X / ($KR * ($L * $K + $RC)) / 256) * 256))")
    CTX=$((PK + OK))
    echo "model $PRESET: $L layers x $H KV heads x $D, KV $K B/token/layer; R $R streams of $P + $O tokens, B $B;" \
      "kill test $KR streams of $PK + $OK"
    # The segment: every layer of every stream of either load on the host (the worst case), within /dev/shm.
    per_stream() { echo $(( L * 2 * (($1 * H * D * E + BB - 1) / BB) * BB )); }
    df -h /dev/shm
    AVAIL=$(( $(df -Pk /dev/shm | awk 'NR == 2 { print $4 }') * 1024 ))
    USABLE=$((AVAIL * 9 / 10 - (8 << 20)))
    NEED=$(( R * $(per_stream $CAP) )); NEED_K=$(( KR * $(per_stream $CTX) ))
    [ $NEED_K -gt $NEED ] && NEED=$NEED_K
    if [ $NEED -gt $USABLE ]; then
      R2=$(( USABLE / $(per_stream $CAP) ))
      echo "/dev/shm: $((AVAIL >> 20)) MiB free, the worst case needs $((NEED >> 20)) MiB: lowering the load to" \
        "$R2 streams (the kill test's layers that do not fit go to pinned memory and are counted)"
      R=$R2; X=$(X_OF $R); NEED=$USABLE
    fi
    if [ "$R" -lt 1 ]; then
      echo "/dev/shm too small for one stream ($((AVAIL >> 20)) MiB free): skipping kvstore-8b"
    else
      BLOCKS=$((NEED / BB))
      name=spc-kv8b-$$
      specontext-kvstore remove --name $name > /dev/null 2>&1
      base="--retrieval-head $HEAD --retriever inproc --budget $B --max-batch $R --max-context $CTX $EXTRA"
      # Calibration: what the planner counts as fixed at start.
      if serve_model kv8b-calib $base; then
        F=$(awk '/^spc_device_memory_bytes\{/ { s += $2 } END { printf "%d", s }' "$OUT/metrics_kv8b-calib_before.txt")
        spc_stop $SPC_PID
        # The planner's own step bound (transient bytes of the largest step, prefill staging on a GPU), as the
        # generator logged it at start.
        WS=$(grep -o 'planner_workspace_bytes=[0-9]*' "$LOGS/gen-kv8b-calib.log" | head -1 | cut -d= -f2)
        if [ -z "$WS" ]; then echo "no planner_workspace_bytes in $LOGS/gen-kv8b-calib.log"; WS=0; fi
        LIMIT=$((F + WS + X))
        echo "planner inputs: fixed at start $((F >> 20)) MiB + step workspace $((WS >> 20)) MiB + KV $((X >> 20)) MiB" \
          "(headroom $HROOM) => --gpu-memory-limit $LIMIT ($((LIMIT >> 20)) MiB)"
        echo "segment: $BLOCKS blocks x $BB B = $(((BLOCKS * BB) >> 20)) MiB in /dev/shm"
        kvargs="$base --gpu-memory-limit $LIMIT --kvstore $name --kvstore-blocks $BLOCKS --kvstore-block-bytes $BB"
        GREEDY=$(for i in $(seq $GREEDY_REPS); do printf '%s ' "${PROMPTS[2]}"; done)
        # (a) the kvstore tier under load.
        if serve_model kv8b-kvstore $kvargs; then
          gpid=$SPC_PID; gport=$SPC_PORT; mport=$SPC_METRICS_PORT
          grep -iE "kvstore segment|register" $LOGS/gen-kv8b-kvstore.log | head -3 | sed 's/^/  /'
          rm -f $W/kv8b.samples.kvstore; kv8b_sample $mport $W/kv8b.samples.kvstore & spid=$!
          loadgen kv8b_kvstore $gport --concurrency $R --requests $R --prompt-tokens $P --output-tokens $O
          kill $spid; wait $spid 2> /dev/null
          spc_scrape $mport "$OUT/metrics_kv8b-kvstore_after.txt"
          echo "kvstore tier: gauges sampled every 2 s during the run (spc_kvstore_used_blocks is refreshed by the" \
            "tracker's 1 s heartbeat, spc_kvstore_host_tier_bytes at once):"; kv8b_sample_summary $W/kv8b.samples.kvstore
          cp $W/kv8b.samples.kvstore "$OUT/kv8b_samples_kvstore.txt"
          kv8b_planner $LOGS/gen-kv8b-kvstore.log
          # (b) greedy text, 8 streams, SIGKILL mid-stream, restart on the same segment.
          specontext-client generate --addr 127.0.0.1:$gport --prompt "$GREEDY" --max-new-tokens 64 --timeout-s 120 \
            > $W/kv8b.greedy.before 2> $W/kv8b.greedy.before.err
          echo "greedy before the kill: $(wc -c < $W/kv8b.greedy.before) bytes"
          timeout 300 specontext-loadgen --addr 127.0.0.1:$gport --quiet --concurrency $KR --requests $KR \
            --prompt-tokens $PK --output-tokens $OK --timeout-s 240 --out $W/kv8b.kill.jsonl \
            > $LOGS/loadgen_kv8b_kill.txt 2>&1 & lpid=$!
          used=0; running=0
          for i in $(seq 120); do
            spc_scrape $mport $W/kv8b.m.txt 2> /dev/null
            used=$(kv8b_metric $W/kv8b.m.txt spc_kvstore_used_blocks); running=$(kv8b_metric $W/kv8b.m.txt spc_generator_running_sequences)
            [ "${used%.*}" -gt 0 ] 2> /dev/null && [ "${running%.*}" -ge $KR ] 2> /dev/null && break
            sleep 0.5
          done
          sleep 1
          echo "before the kill: running $running, used blocks $used, offloaded layers $(kv8b_metric $W/kv8b.m.txt spc_offloaded_layers)"
          specontext-kvstore inspect --name $name | grep -E "blocks:|sequences:|pid" | sed 's/^/  /'
          echo "SIGKILL the generator (pid $gpid) with $KR streams running"; kill -KILL $gpid; wait $gpid 2> /dev/null
          wait $lpid 2> /dev/null
          echo "after the kill:"; specontext-kvstore inspect --name $name | grep -E "blocks:|sequences:|pid" | sed 's/^/  /'
          if serve_model kv8b-restart $kvargs; then
            echo "restart: $(grep -iE 'kvstore segment' $LOGS/gen-kv8b-restart.log | head -1 | sed 's/.*msg=//')"
            echo "after the restart:"; specontext-kvstore inspect --name $name | grep -E "blocks:|sequences:|pid" | sed 's/^/  /'
            used=$(specontext-kvstore inspect --name $name | awk '/blocks:/ { print $4 }')
            [ "$used" = 0 ] && echo "every block of the dead owner reclaimed" || echo "NOT reclaimed: $used blocks used"
            specontext-client generate --addr 127.0.0.1:$SPC_PORT --prompt "$GREEDY" --max-new-tokens 64 --timeout-s 120 \
              > $W/kv8b.greedy.after 2> $W/kv8b.greedy.after.err
            if [ -s $W/kv8b.greedy.before ] && cmp -s $W/kv8b.greedy.before $W/kv8b.greedy.after; then
              echo "greedy text after the restart == before the kill"
            else
              echo "greedy text after the restart DIFFERS:"; head -c 200 $W/kv8b.greedy.before; echo; head -c 200 $W/kv8b.greedy.after; echo
            fi
            spc_stop $SPC_PID
          fi
        fi
        specontext-kvstore remove --name $name > /dev/null 2>&1
        # (a) the same with the pinned host tier.
        if serve_model kv8b-pinned $base --gpu-memory-limit $LIMIT; then
          rm -f $W/kv8b.samples.pinned; kv8b_sample $SPC_METRICS_PORT $W/kv8b.samples.pinned & spid=$!
          loadgen kv8b_pinned $SPC_PORT --concurrency $R --requests $R --prompt-tokens $P --output-tokens $O
          kill $spid; wait $spid 2> /dev/null
          spc_scrape $SPC_METRICS_PORT "$OUT/metrics_kv8b-pinned_after.txt"
          echo "pinned tier: gauges sampled every 2 s during the run:"; kv8b_sample_summary $W/kv8b.samples.pinned
          cp $W/kv8b.samples.pinned "$OUT/kv8b_samples_pinned.txt"
          kv8b_planner $LOGS/gen-kv8b-pinned.log
          spc_stop $SPC_PID
        fi
      fi
    fi
    spc_stop_all
  } 2>&1 | tee "$OUT/kvstore_8b.txt"
fi

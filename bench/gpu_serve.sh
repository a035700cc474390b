#!/usr/bin/env bash
# The services on the GPU machine, within one device call: start the generator (and a retriever), wait until
# they serve, drive them, scrape /metrics, stop everything. docs/gpu.md "Services on the GPU".
# Usage: bench/gpu_serve.sh BUNDLE_DIR OUT_DIR PARTS   PARTS: comma list of
#   equal     greedy text of the service on CUDA == `specontext generate` on CUDA, for stories260K and a tiny
#             random GQA checkpoint: dense, sparse in-process, sparse with a separate retriever; then 32
#             concurrent streams == their single-stream runs (equal.txt)
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
#             and fallback rate under load
# Environment: SPC_SERVE_SECONDS caps each loadgen run (default 90); SPC_BACKEND=cpu smoke-tests the script.
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
PROMPTS=("Once upon a time" "The little dog ran to the" "Lily wanted to play with her friend" "One day, a big")
# compare_cli_service TAG MODEL GEN_ARGS SERVER_ARGS: each prompt through `specontext generate` and the
# service, texts compared; then every prompt 8 times at once (32 streams) against the single runs.
compare_cli_service() {
  local tag=$1 model=$2 gen_args=$3 server_args=$4 i=0 p same=0 diff=0
  spc_start gen-$tag $LOGS specontext-generator --model "$model" --backend $BACKEND --listen 127.0.0.1:0 \
    --metrics-port 0 $server_args || return
  local gpid=$SPC_PID port=$SPC_PORT
  for p in "${PROMPTS[@]}"; do
    specontext generate --model "$model" --backend $BACKEND --prompt "$p" --max-new-tokens 96 --temperature 0 \
      $gen_args > $W/$tag.cli.$i 2> $W/$tag.cli.$i.err
    specontext-client generate --addr 127.0.0.1:$port --prompt "$p" --max-new-tokens 96 --timeout-s 60 \
      > $W/$tag.svc.$i 2> $W/$tag.svc.$i.err
    if cmp -s $W/$tag.cli.$i $W/$tag.svc.$i; then same=$((same + 1)); else
      diff=$((diff + 1)); echo "  $tag prompt $i differs:"; echo "    cli: $(head -c 160 $W/$tag.cli.$i | tr '\n' ' ')"
      echo "    svc: $(head -c 160 $W/$tag.svc.$i | tr '\n' ' ')"; tail -1 $W/$tag.svc.$i.err | sed 's/^/    /'
    fi
    i=$((i + 1))
  done
  echo "$tag service vs cli: $same equal, $diff differ"
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
      if cmp -s $W/$tag.conc.$k.$j $W/$tag.svc.$j; then c_same=$((c_same + 1)); else c_diff=$((c_diff + 1)); fi
    done
  done
  echo "$tag 32 concurrent vs single: $c_same equal, $c_diff differ"
  spc_stop $gpid
}
if has equal; then
  tiny_models
  {
    compare_cli_service stories-dense "$STORIES" "$STOK" "$STOK"
    # stories260K is a llama2.c checkpoint (no layer head to prune): each layer's own top-B (oracle).
    compare_cli_service stories-oracle "$STORIES" "$STOK --sparse --selection-source oracle --budget 16" \
      "$STOK --selection-source oracle --retriever inproc --budget 16"
    compare_cli_service tiny-dense $W/tiny "" ""
    compare_cli_service tiny-sparse $W/tiny "--sparse --retrieval-head $W/tiny-head --budget 8" \
      "--retrieval-head $W/tiny-head --retriever inproc --budget 8"
    if spc_start retriever-tiny $LOGS specontext-retriever --head $W/tiny-head --model $W/tiny \
        --listen 127.0.0.1:0 --metrics-port 0; then
      compare_cli_service tiny-split $W/tiny "--sparse --retrieval-head $W/tiny-head --budget 8" \
        "--retrieval-head $W/tiny-head --retriever 127.0.0.1:$SPC_PORT --budget 8"
      spc_stop $SPC_PID
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
  for where in inproc split; do
    if [ $where = split ]; then
      spc_start retriever-big $LOGS specontext-retriever --head $HEAD --model "$MODEL" \
        --listen 127.0.0.1:0 --metrics-port 0 || continue
      rpid=$SPC_PID; raddr=127.0.0.1:$SPC_PORT
    else
      raddr=inproc
    fi
    serve_model split-$where --retrieval-head $HEAD --retriever $raddr --budget 2048 || continue
    loadgen split_${where}_c32 $SPC_PORT --concurrency 32 --requests 64 --prompt-tokens 2048 --output-tokens 512
    spc_scrape $SPC_METRICS_PORT "$OUT/metrics_split-${where}_after.txt"
    metrics_vs_client split-$where "$OUT/serve_split_${where}_c32.jsonl"
    spc_stop $SPC_PID
    [ $where = split ] && spc_stop $rpid
  done
fi

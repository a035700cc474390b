#!/usr/bin/env bash
# One call on the GPU machine: the bundle's tests, then the chosen benchmarks, results under OUT.
# Usage: bench/gpu_suite.sh BUNDLE_DIR OUT_DIR [PARTS]   PARTS: comma list of
#   tests       every test binary (summary.txt, failures) -> OUT/tests.tgz
#   gather      cuda_gather_bench (host->GPU gather, elastic vs full reload, sparse attention, selection)
#   dense       specontext bench on random Llama-3.1-8B and Llama-3.2-1B shapes
#   sparse-e2e  generate --sparse on CUDA vs CPU with a tiny checkpoint and a pruned `layer` head
#   SpeContext benchmarks 2-4 (`specontext bench --sparse`, docs/sparse.md "Benchmarks"); random
#   Llama shapes with a pruned random EAGLE-3 head; each part fits one 10-minute device call:
#   sparse-b2        benchmark 2: 8B, R 1,8,32 x S 8K,32K, planner on: dense in the same harness, then sparse
#   sparse-b2-synth  the same sparse grid with index sets of 85% overlap between steps (SPC_SYNTH_OVERLAP sets
#                    the overlap of every *-synth part and names its file: 0.86 -> *_synth86.jsonl; the trained
#                    SmolLM2 head measured 0.83-0.86 on tasks, docs/accuracy.md)
#   sparse-b3        benchmark 3: 8B, R 32 (SPC_B3_REQUESTS), [2K prompt, 32K generated], B 2048
#   sparse-b3-synth  the same with index sets of 85% overlap between steps
#   sparse-b4        benchmark 4: 1B, --gpu-memory-limit 4GiB, R 1, [2K, 32K]: sparse, synthetic 0.85, dense
#   sparse-bench     all of them (several device calls' worth: prefer the parts)
#   Each run is capped by `timeout` (SPC_BENCH_TIMEOUT, default 480 s per part) and writes its points as it
#   measures them. The time goes into filling the sequences by prefill (docs/sparse.md "Benchmarks").
#   Run times on the H100 (2026-11-24): sparse-b4 about 2 min (3 runs of 25-30 s of fill each, plus the 1B
#   checkpoint; SPC_B4_QUICK=1 runs the first only); hf-sparse 83 s; 8B parts: about 30 s for the checkpoint,
#   then sparse-b3(-synth) at R = 32 about 3 min (fills with prefill staging and growing device KV;
#   SPC_B3_REQUESTS sets R).
#   hf-b3 / hf-b4    HF eager baselines measured the same way (bench/baselines/hf_sparse_bench.py): 8B with
#                    R 1,4,8,16 (~3 min); 1B with the offloaded cache under 4 GiB (~2 min)
#   hf-sparse        both HF parts (~5 min)
set -u
BUNDLE=$(cd "$1" && pwd); OUT=$2; PARTS=${3:-tests,gather,sparse-e2e}
mkdir -p "$OUT"
. "$BUNDLE/env.sh"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
if has tests; then
  TEST_TIMEOUT=200 "$BUNDLE/run-gpu-tests.sh" /tmp/spc-tests > /dev/null 2>&1
  awk 'NR < 5 || $2 != 0 || /failed/' /tmp/spc-tests/summary.txt
  for f in /tmp/spc-tests/*.failures; do [ -e "$f" ] && { echo "== $f"; head -20 "$f"; }; done
  tar czf "$OUT/tests.tgz" -C /tmp spc-tests
fi
if has gather; then
  timeout 240 cuda_gather_bench --capacity 16384 --reps 5 > "$OUT/gather_bench.txt" 2>&1
  echo "gather bench rc=$?"; tail -40 "$OUT/gather_bench.txt"
fi
if has dense; then
  for p in llama-3.1-8b llama-3.2-1b; do
    specontext-random-checkpoint --preset $p --out /tmp/$p > /dev/null 2>&1
    specontext bench --model /tmp/$p --backend cuda --steps 20 --prefill 2048,8192 --out "$OUT/bench_$p.jsonl" \
      2>&1 | grep -v '^loading' | tail -16
  done
fi
if has sparse-e2e; then
  d=/tmp/spc-e2e; rm -rf $d; mkdir -p $d
  specontext-random-checkpoint --preset tiny-llama-tied-gqa --dtype f32 --seed 5 --out $d/model > /dev/null 2>&1
  specontext prune --source $d/model --kind layer --target $d/model --out $d/head 2>&1 | tail -2
  for be in cpu cuda; do
    for b in 4096 8; do
      specontext generate --model $d/model --prompt "The history of" --max-new-tokens 64 --temperature 0 \
        --backend $be --sparse --retrieval-head $d/head --budget $b > $d/out_${be}_$b.txt 2> $d/err_${be}_$b.txt
      echo "$be budget=$b rc=$? $(tail -2 $d/err_${be}_$b.txt | tr '\n' ' ')"
    done
    specontext generate --model $d/model --prompt "The history of" --max-new-tokens 64 --temperature 0 \
      --backend $be > $d/out_${be}_dense.txt 2>/dev/null
  done
  for f in cuda_4096 cpu_8 cuda_8 cuda_dense; do
    cmp -s $d/out_cpu_dense.txt $d/out_$f.txt && echo "$f == cpu dense" || echo "$f differs from cpu dense"
  done
fi

# ---- SpeContext benchmarks 2-4 -------------------------------------------------------------------
. "$(cd "$(dirname "$0")" && pwd)/lib/models.sh"
# spc_bench SECONDS FILE ARGS...: specontext bench --sparse capped at SECONDS, raw lines in OUT/FILE, a
# summary of each line on stdout.
spc_bench() {
  local secs=$1 file=$2; shift 2
  # SPC_BENCH_ARGS: extra flags for every run (A/B, e.g. "--host-kv-layer-group 8").
  timeout "$secs" specontext bench --sparse --backend cuda "$@" ${SPC_BENCH_ARGS:-} --out "$OUT/$file" 2>&1 | python3 -c '
import json, sys
keys = ("kind", "attention", "requests", "context", "step_ms", "tokens_per_s", "gpu_layers", "overlap",
        "set_overlap", "loaded_vs_full_reload", "copy_ms_per_step", "copy_exposed_ms_per_step", "floor_ms",
        "ratio_to_floor", "decode_observe_ms", "decode_select_ms", "decode_synthetic_ms", "decode_plan_ms",
        "decode_forward_ms", "decode_total_ms", "fill_seconds", "alloc_seconds", "kv_grow_seconds",
        "layer_move_seconds", "generate_seconds", "error")
for line in sys.stdin:
    try:
        j = json.loads(line)
    except ValueError:
        print(line.rstrip()[:200]); continue
    if j.get("kind") == "setup":
        continue
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in j.items() if k in keys}))
'
}
# Each run is capped (SPC_BENCH_TIMEOUT, s) so that one part fits a device call; points are written as they are
# measured, so a capped run still returns its early points.
T=${SPC_BENCH_TIMEOUT:-480}
SYN=${SPC_SYNTH_OVERLAP:-0.85}
SYN_TAG=synth$(python3 -c "print(round(100 * float('$SYN')))")
if has sparse-b2 || has sparse-bench; then
  spc_model llama-3.1-8b
  m="--model /tmp/llama-3.1-8b --retrieval-head /tmp/llama-3.1-8b-head --requests 1,8,32 --context 8192,32768 --steps 10"
  spc_bench 150 sparse_b2_8b_dense.jsonl $m --dense
  spc_bench $((T - 150)) sparse_b2_8b.jsonl $m
fi
if has sparse-b2-synth || has sparse-bench; then
  spc_model llama-3.1-8b
  spc_bench $T sparse_b2_8b_$SYN_TAG.jsonl --model /tmp/llama-3.1-8b --retrieval-head /tmp/llama-3.1-8b-head \
    --requests 1,8,32 --context 8192,32768 --steps 10 --synthetic-overlap $SYN
fi
if has sparse-b3 || has sparse-bench; then
  spc_model llama-3.1-8b
  spc_bench $T sparse_b3_8b.jsonl --model /tmp/llama-3.1-8b --retrieval-head /tmp/llama-3.1-8b-head \
    --requests ${SPC_B3_REQUESTS:-32} --budget 2048 --trajectory 2048:32768 --measure-every 4096 --steps 5
fi
if has sparse-b3-synth || has sparse-bench; then
  spc_model llama-3.1-8b
  spc_bench $T sparse_b3_8b_$SYN_TAG.jsonl --model /tmp/llama-3.1-8b --retrieval-head /tmp/llama-3.1-8b-head \
    --requests ${SPC_B3_REQUESTS:-32} --budget 2048 --trajectory 2048:32768 --measure-every 4096 --steps 5 \
    --synthetic-overlap $SYN
fi
if has sparse-b4 || has sparse-bench; then
  spc_model llama-3.2-1b
  m="--model /tmp/llama-3.2-1b --retrieval-head /tmp/llama-3.2-1b-head --gpu-memory-limit 4GiB --requests 1"
  m="$m --trajectory 2048:32768 --measure-every 2048 --steps 10"
  spc_bench 200 sparse_b4_1b.jsonl $m
  if [ -z "${SPC_B4_QUICK:-}" ]; then  # SPC_B4_QUICK=1: the head's own sets only
    spc_bench 150 sparse_b4_1b_$SYN_TAG.jsonl $m --synthetic-overlap $SYN
    spc_bench 150 sparse_b4_1b_dense.jsonl $m --dense
  fi
fi
HERE=$(cd "$(dirname "$0")" && pwd)
if has hf-b3 || has hf-sparse; then
  timeout 420 python3 "$HERE/baselines/hf_sparse_bench.py" --bench 3 --out "$OUT/hf_sparse_b3.jsonl" --budget-s 360 \
    2>&1 | grep -v Warning | tail -60
fi
if has hf-b4 || has hf-sparse; then
  timeout 300 python3 "$HERE/baselines/hf_sparse_bench.py" --bench 4 --measure-every 2048 \
    --out "$OUT/hf_sparse_b4.jsonl" --budget-s 240 2>&1 | grep -v Warning | tail -40
fi

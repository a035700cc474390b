#!/usr/bin/env bash
# One call on the GPU machine: the bundle's tests, then the chosen benchmarks, results under OUT.
# Usage: bench/gpu_suite.sh BUNDLE_DIR OUT_DIR [PARTS]   PARTS: comma list of
#   tests       every test binary (summary.txt, failures) -> OUT/tests.tgz
#   gather      cuda_gather_bench (host->GPU gather, elastic vs full reload, sparse attention, selection)
#   dense       specontext bench on random Llama-3.1-8B and Llama-3.2-1B shapes
#   sparse-e2e  generate --sparse on CUDA vs CPU with a tiny checkpoint and a pruned `layer` head
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

#!/usr/bin/env bash
# SpeContext's accuracy on the real test model (docs/accuracy.md), on the GPU machine, through the engine that
# serves (`specontext score` and `specontext eval`); one device call per part, results under OUT.
# Usage: bench/gpu_accuracy.sh BUNDLE_DIR OUT_DIR GGUF PARTS   PARTS: comma list of
#   ppl       teacher-forced perplexity of the held-out windows SPC_WINDOWS (comma list of text files; the
#             first 8192 tokens of each), dense and at every budget of SPC_BUDGETS (128,256,512,1024,2048) for
#             every selection source of SPC_SOURCES (window,oracle,quest) and every retrieval head of SPC_HEADS
#             (comma list of NAME=DIR); the first window's runs at SPC_RECALL_BUDGETS (512,1024,2048) also
#             probe attention recall (per-step lines in OUT/recall/). SPC_JOBS runs at once (4): a 135M
#             model leaves the GPU idle between launches, so concurrent processes fill it.
#   tasks     `specontext eval` of the task file SPC_TASKS: the head SPC_TASK_HEAD (NAME=DIR) dense and at
#             SPC_TASK_BUDGETS (512,1024,2048), then each source of SPC_SOURCES at SPC_TASK_SOURCE_BUDGETS (1024)
#   fallback  the weak-retrieval fallback (SPC_FALLBACK, 0.8) of SPC_TASK_HEAD: perplexity of the first window
#             and the task file at SPC_TASK_SOURCE_BUDGETS, with its fallback step and sequence-step counts and tokens/s
#   fidelity  `specontext eval --fidelity` of SPC_PROMPTS (SPC_FIDELITY_TOKENS, 1024, tokens each, past EOS):
#             SPC_TASK_HEAD at 1024 and 2048 against the dense continuations
# SPC_BACKEND=cpu (and small SPC_* lists) checks this script on a machine without a GPU.
# Every run line carries its setting; a run that fails leaves its stderr under OUT/err/.
set -u
BUNDLE=$(cd "$1" && pwd); OUT=$2; GGUF=$3; PARTS=$4
mkdir -p "$OUT/err"
[ -f "$BUNDLE/env.sh" ] && . "$BUNDLE/env.sh"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
BUDGETS=${SPC_BUDGETS:-128,256,512,1024,2048}
RECALL_BUDGETS=${SPC_RECALL_BUDGETS:-512,1024,2048}
SOURCES=${SPC_SOURCES:-window,oracle,quest}
JOBS=${SPC_JOBS:-4}
BACKEND=${SPC_BACKEND:-cuda}  # cpu: a check of this script on a small machine
TASK_SOURCE_BUDGETS=${SPC_TASK_SOURCE_BUDGETS:-1024}
in_list() { [[ ",$2," == *",$1,"* ]]; }

# score_job WINDOW_NAME TEXT NAME SOURCE BUDGET [HEAD_DIR] [EXTRA...]: one perplexity run -> OUT/ppl/*.json
score_job() {
  local win=$1 text=$2 name=$3 source=$4 budget=$5 head=${6:-}; shift 6 2>/dev/null || shift $#
  local tag=$win.$name.$budget args=(--model "$GGUF" --backend "$BACKEND" --text "$text" --max-tokens "${SPC_PPL_TOKENS:-8192}"
    --buckets 1024,2048,4096)
  if [ "$source" != dense ]; then
    args+=(--sparse --budget "$budget" --sink 1 --selection-source "$source")
    [ -n "$head" ] && args+=(--retrieval-head "$head")
    if [ "$win" = "$FIRST_WINDOW" ] && in_list "$budget" "$RECALL_BUDGETS"; then
      args+=(--recall-out "$OUT/recall/$tag.jsonl")
    fi
  fi
  args+=("$@")
  if specontext score "${args[@]}" > "$OUT/ppl/$tag.raw" 2> "$OUT/err/ppl.$tag.err"; then
    python3 -c 'import json, sys; r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
r.update(window=sys.argv[2], setting=sys.argv[3], source=sys.argv[4], budget=None if sys.argv[4] == "dense" else int(sys.argv[5]))
print(json.dumps(r))' "$OUT/ppl/$tag.raw" "$win" "$name" "$source" "$budget" > "$OUT/ppl/$tag.json"
    rm -f "$OUT/ppl/$tag.raw" "$OUT/err/ppl.$tag.err"
  else
    echo "FAILED score $tag: $(tail -1 "$OUT/err/ppl.$tag.err")"
  fi
}
export -f score_job in_list
export GGUF OUT RECALL_BUDGETS BACKEND SPC_PPL_TOKENS

heads=()
[ -n "${SPC_HEADS:-}" ] && IFS=, read -ra heads <<< "$SPC_HEADS"

if has ppl; then
  mkdir -p "$OUT/ppl" "$OUT/recall"
  IFS=, read -ra windows <<< "${SPC_WINDOWS:?SPC_WINDOWS: comma list of held-out text files}"
  export FIRST_WINDOW=$(basename "${windows[0]}" .txt)
  jobs_file=$(mktemp)
  for w in "${windows[@]}"; do
    wn=$(basename "$w" .txt)
    echo "$wn $w dense dense 0" >> "$jobs_file"
    for b in ${BUDGETS//,/ }; do
      for h in "${heads[@]}"; do echo "$wn $w ${h%%=*} head $b ${h#*=}" >> "$jobs_file"; done
      for s in ${SOURCES//,/ }; do echo "$wn $w $s $s $b" >> "$jobs_file"; done
    done
  done
  echo "ppl: $(wc -l < "$jobs_file") runs, $JOBS at once"
  start=$(date +%s)
  xargs -P "$JOBS" -L 1 bash -c 'score_job "$@"' _ < "$jobs_file"
  echo "ppl: $(ls "$OUT"/ppl/*.json | wc -l) done in $(( $(date +%s) - start )) s"
  cat "$OUT"/ppl/*.json > "$OUT/ppl.jsonl"
  (cd "$OUT" && tar czf recall.tgz recall && rm -rf recall ppl)
fi

eval_run() {  # eval_run NAME ARGS...: one `specontext eval` -> OUT/NAME.jsonl, its summary table on stdout
  local name=$1; shift
  local start=$(date +%s)
  if specontext eval --model "$GGUF" --backend "$BACKEND" --out "$OUT/$name.jsonl" "$@" > "$OUT/err/$name.out" \
       2> "$OUT/err/$name.err"; then
    echo "== $name ($(( $(date +%s) - start )) s)"; tail -n 30 "$OUT/err/$name.out"
    rm -f "$OUT/err/$name.err"
  else
    echo "FAILED eval $name: $(tail -3 "$OUT/err/$name.err")"
  fi
}
TASK_HEAD=${SPC_TASK_HEAD:-}
head_args() { echo "--sparse --sink 1 --retrieval-head ${TASK_HEAD#*=}"; }
if has tasks; then
  : "${SPC_TASKS:?SPC_TASKS: the task file}" "${TASK_HEAD:?SPC_TASK_HEAD: NAME=DIR}"
  eval_run "tasks_${TASK_HEAD%%=*}" --tasks "$SPC_TASKS" $(head_args) --dense \
    --budgets "${SPC_TASK_BUDGETS:-512,1024,2048}" --max-batch "${SPC_MAX_BATCH:-32}"
  for s in ${SOURCES//,/ }; do
    eval_run "tasks_$s" --tasks "$SPC_TASKS" --sparse --sink 1 --selection-source "$s" \
      --budgets "$TASK_SOURCE_BUDGETS" --max-batch "${SPC_MAX_BATCH:-32}"
  done
fi
if has fallback; then
  : "${TASK_HEAD:?SPC_TASK_HEAD: NAME=DIR}"
  F=${SPC_FALLBACK:-0.8}
  IFS=, read -ra windows <<< "${SPC_WINDOWS:?SPC_WINDOWS: comma list of held-out text files}"
  mkdir -p "$OUT/ppl" "$OUT/recall"
  export FIRST_WINDOW=$(basename "${windows[0]}" .txt)
  for b in ${TASK_SOURCE_BUDGETS//,/ }; do
    score_job "$FIRST_WINDOW" "${windows[0]}" "${TASK_HEAD%%=*}-fallback$F" head "$b" "${TASK_HEAD#*=}" \
      --fallback-mass "$F"
  done
  cat "$OUT"/ppl/*.json > "$OUT/ppl_fallback.jsonl" 2>/dev/null
  (cd "$OUT" && tar czf recall_fallback.tgz recall && rm -rf recall ppl)
  [ -n "${SPC_TASKS:-}" ] && eval_run "tasks_${TASK_HEAD%%=*}_fallback$F" --tasks "$SPC_TASKS" $(head_args) \
    --fallback-mass "$F" --budgets "$TASK_SOURCE_BUDGETS" --max-batch "${SPC_MAX_BATCH:-32}"
fi
if has fidelity; then
  : "${SPC_PROMPTS:?SPC_PROMPTS: the prompts file}" "${TASK_HEAD:?SPC_TASK_HEAD: NAME=DIR}"
  eval_run "fidelity_${TASK_HEAD%%=*}" --fidelity --prompts "$SPC_PROMPTS" $(head_args) \
    --budgets 1024,2048 --max-new-tokens "${SPC_FIDELITY_TOKENS:-1024}" --ignore-eos \
    --max-batch "${SPC_MAX_BATCH:-32}"
fi

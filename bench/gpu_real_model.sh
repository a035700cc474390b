#!/usr/bin/env bash
# The real test model on the GPU machine, one device call per part; results under OUT.
# Usage: bench/gpu_real_model.sh BUNDLE_DIR OUT_DIR GGUF PARTS   PARTS: comma list of
#   parity   HF transformers (the machine's Python, f32, sdpa) vs `specontext score` teacher-forced decode
#            steps on CUDA (8192 tokens) and on the CPU (2048 tokens) over the start of Austen's Persuasion:
#            top-1 agreement, KL(HF || ours) and the largest logit difference per position bucket
#            (tools/reference/gguf_parity.py), plus chat answers from `specontext generate` on both backends
#   tests    the bundle's test binaries (TEST_FILTER narrows them)
#   train-a  an EAGLE-3 draft trained at 2K (train/eagle3), saved in SpecForge's layout and pruned with
#            YaRN x4 to the target's 8K, as the paper stretches published drafts
#   train-b  the same trained on windows of 8K, RoPE base of the target, no scaling
#   train-c  train-b plus attention distillation (train/eagle3/attn.py): the head's per-KV-head selection
#            distribution pulled towards the target's attention, element-wise max over layers and the group's heads.
#            SPC_ATTN_SEQ=2048 trains it like train-a instead (YaRN x4 at 8K); SPC_ATTN_WEIGHT (1),
#            SPC_ATTN_AGG (max|mean), SPC_ATTN_LOSS (kl|topk) pick the loss; SPC_DISTILL_CACHE keeps the
#            target's self-distillation answers for the next run
#   attn-ab  short variants of the attention loss in one process (train/eagle3/ab.py), one recall table:
#            no distillation, KL mean, KL max, top-k mean, KL mean x4; at 2K (SPC_AB_SEQ=8192: at 8K)
#   recall   attention recall at 8K of the pruned heads (or drafts) listed in SPC_HEADS (comma list of dirs)
# Every train part also writes the head's held-out attention recall at 8K (recall.json; YaRN x4 for train-a,
# as prune --yarn-factor auto). The training parts need no bundle (BUNDLE/env.sh is sourced if present); with
# one, they also prune the draft into OUT/NAME/head.
# The machine needs the `gguf` Python package (carry its wheel: docs/gpu.md).
set -u
BUNDLE=$(cd "$1" && pwd); OUT=$2; GGUF=$3; PARTS=$4
REPO=$(pwd)
mkdir -p "$OUT"
[ -f "$BUNDLE/env.sh" ] && . "$BUNDLE/env.sh"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
# The corpora travel in an ignored folder of the checkout (../shared stays behind): SPC_CORPORA.
CORPORA=${SPC_CORPORA:-$REPO/.carry/corpora}
TEXT=$CORPORA/austen/persuasion.txt

if has parity; then
  d=/tmp/spc-parity; mkdir -p $d
  python3 tools/reference/gguf_parity.py reference --gguf "$GGUF" --text "$TEXT" --tokens 8192 --out $d \
    --device cuda --attn sdpa 2>&1 | grep -v -i warn | tail -3
  for be in cuda cpu; do
    n=8192; [ $be = cpu ] && n=2048
    specontext score --model "$GGUF" --backend $be --token-ids $d/ids.json --max-tokens $n \
      --buckets 1024,4096 --logits-out $d/ours_$be.npy > $OUT/score_$be.json 2> $d/score_$be.err
    echo "score $be rc=$? $(cat $OUT/score_$be.json)"; tail -2 $d/score_$be.err
    python3 tools/reference/gguf_parity.py compare --ref $d --ours $d/ours_$be.npy --buckets 1024,4096 \
      --json-out $OUT/parity_$be.json > /dev/null
    cat $OUT/parity_$be.json
  done
  for be in cuda cpu; do
    for q in "What is the capital of France?" "Write a haiku about the sea."; do
      specontext generate --model "$GGUF" --backend $be --chat-template auto --prompt "$q" --max-new-tokens 64 \
        --temperature 0 2> $d/gen.err | tee -a $OUT/generate_$be.txt
      tail -1 $d/gen.err
    done
  done
fi
if has tests; then
  TEST_TIMEOUT=200 "$BUNDLE/run-gpu-tests.sh" /tmp/spc-tests > /dev/null 2>&1
  awk 'NR < 5 || $2 != 0 || /failed/' /tmp/spc-tests/summary.txt
  for f in /tmp/spc-tests/*.failures; do [ -e "$f" ] && { echo "== $f"; head -20 "$f"; }; done
  tar czf "$OUT/tests.tgz" -C /tmp spc-tests
fi
train() {  # train NAME ARGS... -> OUT/NAME: logs, summary, pruned head; the draft itself in two parts
  local name=$1; shift
  local t=/tmp/spc-train-$name
  python3 train/eagle3/train.py --gguf "$GGUF" --corpora "$CORPORA" --out $t "$@" 2>&1 \
    | grep -v -i warn | tail -25
  mkdir -p $OUT/$name
  cp $t/summary.json $t/train_log.jsonl $t/recall.json $OUT/$name/ 2>/dev/null
  (cd $t/draft && tar cf - config.json model.safetensors | split -b 15M - $OUT/$name/draft.tar.part-)
  # With the bundle at hand, the retrieval head as a user makes it (YaRN to the target's context when the
  # draft was trained shorter: `auto` is 1 otherwise).
  if command -v specontext > /dev/null; then
    specontext prune --source $t/draft --kind eagle3 --target "$GGUF" --out $OUT/$name/head --yarn-factor auto \
      2>&1 | tail -2
  fi
}
if has train-a; then
  train head-2k --seq-len 2048 --batch 16 --steps 1200 --minutes ${SPC_TRAIN_MINUTES:-5} --rope-theta 10000 \
    --recall-seq-len 8192
fi
if has train-b; then
  train head-8k --seq-len 8192 --batch 4 --steps 1200 --minutes ${SPC_TRAIN_MINUTES:-5} --rope-theta 100000
fi
ctx() {  # the context recipe of train-a (2048) or train-b (8192)
  if [ "$1" = 2048 ]; then echo "--seq-len 2048 --batch 16 --rope-theta 10000 --recall-seq-len 8192"
  else echo "--seq-len 8192 --batch 4 --rope-theta 100000"; fi
}
if has train-c; then
  n=${SPC_ATTN_SEQ:-8192} w=${SPC_ATTN_WEIGHT:-1}
  train head-$((n / 1024))k-attn-w$w $(ctx $n) --steps 1200 --minutes ${SPC_TRAIN_MINUTES:-5} \
    --attn-distill $w --attn-agg ${SPC_ATTN_AGG:-max} --attn-loss ${SPC_ATTN_LOSS:-kl} \
    ${SPC_DISTILL_CACHE:+--distill-cache $SPC_DISTILL_CACHE}
fi
if has attn-ab; then
  n=${SPC_AB_SEQ:-2048}
  C="--gguf $GGUF --corpora $CORPORA $(ctx $n) --steps 250 --minutes 0.9 --self-distill 0 --eval-every 50
     --eval-batches 2 --recall-windows 4"
  python3 train/eagle3/ab.py --out $OUT/attn-ab-$((n / 1024))k --work /tmp/spc-ab --common "$C" \
    --run base="--attn-distill 0" --run kl_mean="--attn-distill 1 --attn-agg mean" --run kl_max="--attn-distill 1 --attn-agg max" \
    --run topk_mean="--attn-distill 1 --attn-agg mean --attn-loss topk" --run kl_mean_w4="--attn-distill 4 --attn-agg mean" \
    2>&1 | grep -v -i warn | tail -12
fi
if has recall; then
  IFS=, read -ra heads <<< "${SPC_HEADS:?SPC_HEADS: comma list of head or draft directories}"
  args=(); for h in "${heads[@]}"; do args+=(--draft "$h"); done
  python3 train/eagle3/recall.py --gguf "$GGUF" --corpora "$CORPORA" "${args[@]}" --seq-len 8192 \
    --out $OUT/recall_heads.jsonl 2>&1 | grep -v -i warn | tail -${#heads[@]}
fi

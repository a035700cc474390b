#!/usr/bin/env bash
# Regenerates docs/img/accuracy (tables.md and the PNGs) from the result files of this folder.
R=$(cd "$(dirname "$0")" && pwd)
python3 "$R/../../../../tools/eval/accuracy_report.py" --subset 12 \
  --tasks head-w1=$R/tasks_ruler1400_head-w1.jsonl.gz --tasks window=$R/tasks_ruler1400_window.jsonl.gz \
  --tasks head-max=$R/tasks_ruler336_head-max.jsonl.gz --tasks head-max-fallback0.9=$R/tasks_ruler336_head-max_fallback0.9.jsonl.gz \
  --tasks head-max-fallback0.95=$R/tasks_ruler336_head-max_fallback0.95.jsonl.gz \
  --tasks head-w4=$R/tasks_ruler336_head-w4.jsonl.gz --tasks oracle=$R/tasks_ruler336_oracle.jsonl.gz \
  --tasks quest=$R/tasks_ruler336_quest.jsonl.gz --tasks head-w1-fallback0.8=$R/tasks_ruler336_head-w1-fallback0.8.jsonl.gz \
  --tasks head-w1-fallback0.95=$R/tasks_ruler336_head-w1-fallback0.95.jsonl.gz \
  --ppl $R/ppl_persuasion_8k.jsonl --ppl $R/ppl_persuasion_8k_b128_b256.jsonl --ppl $R/ppl_persuasion_8k_head-max.jsonl \
  --recall head-w1=$R/train/head-8k-attn-w1_recall.json --recall head-w4=$R/train/head-8k-attn-w4_recall.json \
  --recall head-max=$R/train/head-8k-attn-max_recall.json \
  --fidelity $R/fidelity_head-w1.jsonl.gz --out-dir "${1:-$R/../../../../docs/img/accuracy}"

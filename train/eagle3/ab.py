#!/usr/bin/env python3
"""Several train.py variants in one process (the target and the tokenized corpora are loaded once, the
target's answers shared through --distill-cache), then one table of their held-out top-1 agreement and
attention recall. For comparing recipes inside one 10-minute device call.

  python3 train/eagle3/ab.py --out OUT --common "--gguf M.gguf --corpora C --seq-len 2048 --steps 300" \\
      --run base="--attn-distill 0" --run kl_mean="--attn-distill 1 --attn-agg mean" --run kl_max="--attn-distill 1 --attn-agg max"

Each variant writes WORK/NAME (train.py's outputs, the draft included); OUT gets only ab.json (each variant's
summary and recall, rewritten after each variant, so a cut-off call keeps what finished) and NAME_train_log.jsonl.
"""
import argparse
import json
import os
import shlex
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="", help="where the variants' own outputs go (default: OUT)")
    p.add_argument("--common", default="", help="train.py arguments shared by every variant")
    p.add_argument("--run", action="append", required=True, help='NAME="train.py arguments" (repeatable)')
    a = p.parse_args()
    work = a.work or a.out
    os.makedirs(a.out, exist_ok=True)
    cache = os.path.join(work, "self_distill.json")
    rows = []
    for spec in a.run:
        name, _, args = spec.partition("=")
        out = os.path.join(work, name)
        argv = shlex.split(a.common) + ["--distill-cache", cache] + shlex.split(args) + ["--out", out]
        train.log(f"== {name}: {' '.join(argv)}")
        train.main(argv)
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
        with open(os.path.join(out, "recall.json")) as f:
            s["held_out_recall"] = json.load(f)
        rows.append({"name": name, "args": args, **s})
        if work != a.out:
            shutil.copy(os.path.join(out, "train_log.jsonl"), os.path.join(a.out, f"{name}_train_log.jsonl"))
        with open(os.path.join(a.out, "ab.json"), "w") as f:
            json.dump(rows, f, indent=1)
    budgets = list(rows[0]["held_out_recall"]["mean"]["head"])
    print(f"{'variant':14s} {'steps':>5s} {'train_s':>7s} {'top1':>6s}  recall at B = " + " ".join(f"{b:>6s}" for b in budgets))
    for r in rows:
        rec = r["held_out_recall"]["mean"]["head"]
        print(f"{r['name']:14s} {r['steps']:5d} {r['train_seconds']:7.1f} {r['held_out_top1_agreement_k'][0]:6.3f}"
              f"  {'':13s} " + " ".join(f"{rec[b]:6.3f}" for b in budgets))
    m = rows[0]["held_out_recall"]["mean"]
    for ref in ("window", "shared_oracle", "oracle"):
        print(f"{ref:14s} {'':5s} {'':7s} {'':6s}  {'':13s} " + " ".join(f"{m[ref][b]:6.3f}" for b in budgets))


if __name__ == "__main__":
    main()

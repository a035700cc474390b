#!/usr/bin/env python3
"""PNG curves of train.py runs (train_log.jsonl): the training loss, the draft's top-1 agreement with the target
(training batches, smoothed, and the held-out points), and, where logged, the attention-distillation KL and the
head's held-out attention recall per budget.

  python3 train/eagle3/plot.py RUN_A/train_log.jsonl RUN_B/train_log.jsonl --labels 2k,8k --out curves.png
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def smooth(steps, xs, width):
    """Centered moving average over `width` steps (per-batch values are noisy; logs may keep every k-th step)."""
    out, lo, hi, acc = [], 0, 0, 0.0
    for s in steps:
        while hi < len(xs) and steps[hi] <= s + width / 2:
            acc += xs[hi]
            hi += 1
        while steps[lo] < s - width / 2:
            acc -= xs[lo]
            lo += 1
        out.append(acc / (hi - lo))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("--labels", default="", help="comma list (default: each log's folder name)")
    p.add_argument("--out", required=True)
    p.add_argument("--smooth", type=int, default=50, help="moving-average width in steps")
    p.add_argument("--title", default="")
    a = p.parse_args()
    labels = a.labels.split(",") if a.labels else [os.path.basename(os.path.dirname(os.path.abspath(x)))
                                                   for x in a.logs]
    runs = [(lab, read(x)) for lab, x in zip(labels, a.logs)]
    has_attn = any("attn_kl" in r for _, recs in runs for r in recs)
    has_recall = any("held_out_recall_head" in r for _, recs in runs for r in recs)
    panels = ["loss", "top1"] + (["attn"] if has_attn else []) + (["recall"] if has_recall else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (lab, recs) in enumerate(runs):
        c = colors[i % len(colors)]
        steps = [r["step"] for r in recs]
        axes["loss"].plot(steps, smooth(steps, [r["loss"] for r in recs], a.smooth), color=c, label=lab)
        ttt = len(recs[0]["top1_k"])
        for k in range(ttt):
            axes["top1"].plot(steps, smooth(steps, [r["top1_k"][k] for r in recs], a.smooth), color=c,
                              alpha=1.0 - 0.25 * k, lw=1.2, label=f"{lab} step {k}" if k else f"{lab} train")
        held = [r for r in recs if "held_out_top1_k" in r]
        axes["top1"].plot([r["step"] for r in held], [r["held_out_top1_k"][0] for r in held], "o", color=c,
                          ms=4, label=f"{lab} held out")
        if "attn" in axes:
            att = [r for r in recs if "attn_kl" in r]
            if att:
                axes["attn"].plot([r["step"] for r in att], smooth([r["step"] for r in att], [r["attn_kl"] for r in att], a.smooth),
                                  color=c, label=lab)
        if "recall" in axes:
            rec = [r for r in recs if "held_out_recall_head" in r]
            for j, b in enumerate(rec[0]["held_out_recall_head"] if rec else []):
                axes["recall"].plot([r["step"] for r in rec], [r["held_out_recall_head"][b] for r in rec],
                                    marker="o", ms=3, color=c, alpha=1.0 - 0.15 * j, label=f"{lab} B={b}")
    axes["loss"].set(title="training loss (TTT-weighted)", xlabel="step")
    axes["top1"].set(title="top-1 agreement with the target", xlabel="step")
    if "attn" in axes:
        axes["attn"].set(title="attention KL(P || Q)", xlabel="step")
    if "recall" in axes:
        axes["recall"].set(title="head's held-out attention recall", xlabel="step", ylim=(0, 1))
    for ax in axes.values():
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if a.title:
        fig.suptitle(a.title)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(a.out)


if __name__ == "__main__":
    main()

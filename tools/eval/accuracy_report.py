#!/usr/bin/env python3
"""Tables (Markdown) and PNG plots of SpeContext accuracy results (docs/accuracy.md "Measurements").

Inputs are the files the tools write (or their .gz), so any run in the documented formats can be reported:
  --tasks LABEL=FILE       `specontext eval` task results; dense rows are "dense", sparse rows "LABEL@BUDGET"
  --ppl FILE               `specontext score` lines (one per run; bench/gpu_accuracy.sh adds "setting", "window")
  --recall LABEL=FILE      train/eagle3 recall.json (held-out attention recall per set, budget and position)
  --fidelity FILE          `specontext eval --fidelity` results
  --subset N               also tabulate tasks over the first N samples of each category and length (ids end
                           in -NNN), where some settings ran only those

  python3 tools/eval/accuracy_report.py --tasks head=R/tasks.jsonl --ppl R/ppl.jsonl --out-dir docs/img/accuracy
Writes OUT_DIR/tables.md and, when matplotlib is importable, OUT_DIR/*.png.
"""
import argparse
import collections
import gzip
import json
import os
import re


def read_jsonl(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def labelled(specs):
    out = []
    for s in specs:
        if "=" not in s:
            raise SystemExit(f"accuracy_report: expected LABEL=FILE, got {s!r}")
        label, path = s.split("=", 1)
        out.append((label, path))
    return out


def sample_index(task_id):
    m = re.search(r"-(\d+)$", str(task_id))
    return int(m.group(1)) if m else 0


def task_scores(specs, subset):
    """{setting: {(category, length): [scores]}}; dense taken from the first file that has it."""
    scores = collections.defaultdict(lambda: collections.defaultdict(list))
    dense_from = None
    for label, path in specs:
        for r in read_jsonl(path):
            if r.get("type") != "result" or (subset and sample_index(r["id"]) >= subset):
                continue
            if r["setting"] == "dense":
                if dense_from not in (None, path):
                    continue
                dense_from, name = path, "dense"
            else:
                name = f"{label}@{r['budget']}"
            scores[name][(r.get("category") or "-", int(r.get("length") or 0))].append(r["score"])
    return scores


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def tasks_table(scores, title):
    settings = list(scores)
    keys = sorted({k for s in scores.values() for k in s})
    lines = [f"### {title}", "", "| task | length | " + " | ".join(settings) + " |",
             "|---|---:|" + "---:|" * len(settings)]
    for cat, length in keys:
        cells = [f"{100 * mean(scores[s].get((cat, length), [])):.1f}" for s in settings]
        lines.append(f"| {cat} | {length} | " + " | ".join(cells) + " |")
    for length in sorted({k[1] for k in keys}):
        cells = [f"**{100 * mean([x for (c, l), v in scores[s].items() if l == length for x in v]):.1f}**"
                 for s in settings]
        lines.append(f"| **all** | {length} | " + " | ".join(cells) + " |")
    cells = [f"**{100 * mean([x for v in scores[s].values() for x in v]):.1f}**" for s in settings]
    n = {s: sum(len(v) for v in scores[s].values()) for s in settings}
    lines.append("| **all** | all | " + " | ".join(cells) + " |")
    lines += ["", "Tasks per setting: " + ", ".join(f"{s} {n[s]}" for s in settings) + ".", ""]
    return lines


def overlap_lines(specs):
    lines = ["| file | budget | samples | mean | p10 | p50 | p90 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, path in specs:
        rows = read_jsonl(path)
        # Per-layer sources choose inside each layer: their decoder sets are placeholders with no overlap.
        if rows and rows[0].get("selection_source") in ("oracle", "quest"):
            continue
        for r in rows:
            if r.get("type") == "overlap" and r.get("samples"):
                lines.append(f"| {label} | {r['budget']} | {r['samples']} | {r['mean']:.3f} | {r['p10']:.3f} | "
                             f"{r['p50']:.3f} | {r['p90']:.3f} |")
    return lines + [""]


def ppl_rows(paths):
    rows = []
    for p in paths:
        for r in read_jsonl(p):
            setting = r.get("setting") or ("dense" if not r.get("sparse") else r.get("selection_source", "head"))
            rows.append((r.get("window", os.path.basename(r.get("text", "") or "")), setting, r.get("budget"),
                         r["perplexity"], r))
    return rows


def ppl_table(rows):
    dense = {w: p for w, s, b, p, _ in rows if s == "dense"}
    settings = sorted({s for _, s, _, _, _ in rows if s != "dense"})
    budgets = sorted({b for _, s, b, _, _ in rows if s != "dense"})
    lines = []
    for w in sorted({r[0] for r in rows}):
        lines += [f"Window `{w}` (dense perplexity {dense.get(w, float('nan')):.2f}); sparse perplexity and its "
                  "excess over dense:", "", "| setting | " + " | ".join(f"B = {b}" for b in budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        for s in settings:
            cells = []
            for b in budgets:
                hit = [p for ww, ss, bb, p, _ in rows if (ww, ss, bb) == (w, s, b)]
                cells.append(f"{hit[0]:.2f} ({100 * (hit[0] / dense[w] - 1):+.1f}%)" if hit and w in dense else "")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def recall_table(specs):
    """Every set of the first file; the head row of the others (the same windows and queries when the runs
    share their length and seed, as train.py's are)."""
    first = json.load(open(specs[0][1]))
    budgets = [str(b) for b in first["budgets"]]
    lines = [f"{first['windows']} held-out windows of {first['seq_len']} tokens, {first['queries']} query positions",
             "", "| set | " + " | ".join(f"B = {b}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for name, vals in first["mean"].items():
        label = f"head ({specs[0][0]})" if name == "head" else name
        lines.append(f"| {label} | " + " | ".join(f"{vals[b]:.3f}" for b in budgets) + " |")
    for label, path in specs[1:]:
        vals = json.load(open(path))["mean"]["head"]
        lines.append(f"| head ({label}) | " + " | ".join(f"{vals.get(b, float('nan')):.3f}" for b in budgets) + " |")
    return lines + [""]


def fidelity_table(paths):
    lines = ["| budget | prompts | median tokens to first divergence | diverged | NLL gap (nats/token) | "
             "distinct 4-grams (dense → sparse) |", "|---:|---:|---:|---:|---:|---|"]
    for p in paths:
        for r in read_jsonl(p):
            if r.get("type") == "fidelity_summary" and r.get("category") == "*":
                lines.append(f"| {r['budget']} | {r['n']} | {r['tokens_to_divergence_median']:.1f} | "
                             f"{100 * r['diverged_mean']:.0f}% | {r['nll_gap_mean']:+.4f} | "
                             f"{r['distinct4_reference_mean']:.3f} → {r['distinct4_candidate_mean']:.3f} |")
    return lines + [""]


def task_plot(plt, path, scores, title):
    lengths = sorted({k[1] for s in scores.values() for k in s})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s, v in scores.items():
        ys = [100 * mean([x for (c, l), xs in v.items() if l == L for x in xs]) for L in lengths]
        ax.plot(lengths, ys, marker="o", label=s, lw=2.5 if s == "dense" else 1.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set(xlabel="task length (tokens)", ylabel="RULER-style score (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plots(out_dir, scores, subset_scores, rows, recall_specs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    if scores:
        task_plot(plt, os.path.join(out_dir, "tasks_by_length.png"), scores, "Task accuracy by length (every task)")
        made.append("tasks_by_length.png")
    if subset_scores:
        task_plot(plt, os.path.join(out_dir, "tasks_by_length_subset.png"), subset_scores,
                  "Task accuracy by length (every setting, the shared samples)")
        made.append("tasks_by_length_subset.png")
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for w in sorted({r[0] for r in rows}):
            dense = [p for ww, s, _, p, _ in rows if ww == w and s == "dense"]
            for s in sorted({r[1] for r in rows if r[0] == w and r[1] != "dense"}):
                pts = sorted((b, p) for ww, ss, b, p, _ in rows if ww == w and ss == s)
                ax.plot([b for b, _ in pts], [p for _, p in pts], marker="o", label=f"{s}")
            if dense:
                ax.axhline(dense[0], color="k", ls="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # a weak source (quest at small B) is several times dense: keep the others readable
        ax.set(xlabel="budget B (tokens per KV head)", ylabel="perplexity (log)", title="Held-out perplexity at 8K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "perplexity_vs_budget.png"), dpi=110)
        made.append("perplexity_vs_budget.png")
    if recall_specs:
        label, path = recall_specs[0]
        r = json.load(open(path))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        budgets = [str(b) for b in r["budgets"]]
        for name, vals in r["mean"].items():
            a1.plot([int(b) for b in budgets], [vals[b] for b in budgets], marker="o", label=name)
        for lab, p in recall_specs[1:]:
            vals = json.load(open(p))["mean"]["head"]
            a1.plot([int(b) for b in budgets], [vals[b] for b in budgets], marker="x", ls=":", label=f"head ({lab})")
        a1.set_xscale("log", base=2)
        a1.set(xlabel="budget B", ylabel="attention recall", title=f"Recall vs budget ({r['seq_len']} tokens)")
        a1.grid(alpha=0.3)
        a1.legend(fontsize=8)
        b = "1024" if "1024" in budgets else budgets[-1]
        names = list(r["mean"])
        buckets = list(r["buckets"])
        for name in names:
            a2.plot(range(len(buckets)), [r["buckets"][k][name][b] for k in buckets], marker="o", label=name)
        a2.set_xticks(range(len(buckets)), buckets, rotation=45, fontsize=7)
        a2.set(xlabel="query position", ylabel="attention recall", title=f"Recall vs position (B = {b})")
        a2.grid(alpha=0.3)
        a2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "recall.png"), dpi=110)
        made.append("recall.png")
    return made


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", action="append", default=[])
    p.add_argument("--ppl", action="append", default=[])
    p.add_argument("--recall", action="append", default=[])
    p.add_argument("--fidelity", action="append", default=[])
    p.add_argument("--subset", type=int, default=0)
    p.add_argument("--out-dir", required=True)
    a = p.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    task_specs, recall_specs = labelled(a.tasks), labelled(a.recall)
    full = task_scores(task_specs, 0)
    # The full table holds the settings that ran every task; --subset tabulates all settings on the shared part.
    counts = {s: sum(len(v) for v in full[s].values()) for s in full}
    most = max(counts.values()) if counts else 0
    md = []
    if full:
        md += tasks_table({s: v for s, v in full.items() if counts[s] == most}, "Every task")
    subset = task_scores(task_specs, a.subset) if a.subset else None
    if subset:
        md += tasks_table(subset, f"The first {a.subset} samples of each task and length")
    if task_specs:
        md += ["### Step-to-step overlap of the index sets", ""] + overlap_lines(task_specs)
    rows = ppl_rows(a.ppl)
    if rows:
        md += ["### Perplexity", ""] + ppl_table(rows)
    if recall_specs:
        md += ["### Attention recall", ""] + recall_table(recall_specs)
    if a.fidelity:
        md += ["### Long-generation fidelity", ""] + fidelity_table(a.fidelity)
    with open(os.path.join(a.out_dir, "tables.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    made = plots(a.out_dir, full and {s: v for s, v in full.items() if counts[s] == most}, subset, rows, recall_specs)
    print(f"accuracy_report: {a.out_dir}/tables.md" + "".join(f", {m}" for m in made))


if __name__ == "__main__":
    main()

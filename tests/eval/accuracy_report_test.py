#!/usr/bin/env python3
"""Tests of tools/eval/accuracy_report.py and tools/eval/held_out.py on small synthetic inputs: task scores
aggregate per setting, category and length (dense taken once, sparse rows labelled LABEL@BUDGET, gzip read),
--subset keeps the first samples, per-layer sources report no overlap, perplexity excess is relative to the
window's dense run; held_out.py writes exactly the held-out part of each corpus and seeded prompts."""
import gzip
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(ROOT, "tools", "eval", "accuracy_report.py")
HELD_OUT = os.path.join(ROOT, "tools", "eval", "held_out.py")


def write_jsonl(path, rows):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def result(i, setting, budget, score, cat="niah_single", length=1024):
    return {"type": "result", "id": f"{cat}-{length}-{i:03d}", "category": cat, "length": str(length),
            "setting": setting, "budget": budget, "score": score}


def main():
    failures = []

    def check(cond, what):
        if not cond:
            failures.append(what)

    with tempfile.TemporaryDirectory() as d:
        head = os.path.join(d, "head.jsonl.gz")
        write_jsonl(head, [{"type": "run", "selection_source": "head"}] +
                    [result(i, "dense", None, 1.0) for i in range(4)] +
                    [result(i, "sparse", 1024, 1.0 if i < 1 else 0.0) for i in range(4)] +
                    [{"type": "overlap", "budget": 1024, "samples": 10, "mean": 0.8, "p10": 0.7, "p50": 0.8,
                      "p90": 0.9}])
        oracle = os.path.join(d, "oracle.jsonl")
        write_jsonl(oracle, [{"type": "run", "selection_source": "oracle"}] +
                    [result(i, "dense", None, 0.0) for i in range(2)] +   # a second dense run: ignored
                    [result(i, "sparse", 1024, 1.0) for i in range(2)] +
                    [{"type": "overlap", "budget": 1024, "samples": 5, "mean": 0.999, "p10": 0.999, "p50": 0.999,
                      "p90": 0.999}])
        ppl = os.path.join(d, "ppl.jsonl")
        write_jsonl(ppl, [{"window": "w", "setting": "dense", "budget": None, "perplexity": 20.0, "sparse": False},
                          {"window": "w", "setting": "head", "budget": 1024, "perplexity": 21.0, "sparse": True}])
        out = os.path.join(d, "report")
        run = subprocess.run([sys.executable, REPORT, "--tasks", f"head={head}", "--tasks", f"oracle={oracle}",
                              "--subset", "2", "--ppl", ppl, "--out-dir", out], capture_output=True, text=True)
        check(run.returncode == 0, f"report failed: {run.stderr}")
        md = open(os.path.join(out, "tables.md")).read() if run.returncode == 0 else ""
        every = md.split("### The first")[0]
        check("| niah_single | 1024 | 100.0 | 25.0 |" in every, "every-task table: dense 100, head@1024 25\n" + every)
        check("oracle@1024" not in every, "settings that ran only the subset stay out of the full table")
        check("| niah_single | 1024 | 100.0 | 50.0 | 100.0 |" in md, "subset table: dense, head, oracle\n" + md)
        check("| head | 1024 | 10 | 0.800 |" in md, "head overlap row")
        check("| oracle | 1024 |" not in md, "a per-layer source reports no overlap")
        check("21.00 (+5.0%)" in md, "perplexity excess over the window's dense run")
        bad = subprocess.run([sys.executable, REPORT, "--tasks", head, "--out-dir", out], capture_output=True,
                             text=True)
        check(bad.returncode != 0 and "LABEL=FILE" in bad.stderr, "a --tasks without a label is refused")

        corpora = os.path.join(d, "corpora")
        os.makedirs(corpora)
        # Lines of one length: the held-out part starts after the first newline at or past 90% of the characters,
        # i.e. after the first held line.
        text = "".join(f"line {i:02d} of training text\n" for i in range(90)) + \
            "".join(f"held {i:02d} of held-out text\n" for i in range(10))
        with open(os.path.join(corpora, "c.txt"), "w") as f:
            f.write(text)
        held = os.path.join(d, "held")
        run = subprocess.run([sys.executable, HELD_OUT, "texts", "--corpora", corpora, "--out", held],
                             capture_output=True, text=True)
        check(run.returncode == 0, f"held_out texts failed: {run.stderr}")
        got = open(os.path.join(held, "c.txt")).read() if run.returncode == 0 else ""
        check(got == "".join(f"held {i:02d} of held-out text\n" for i in range(1, 10)),
              f"held-out text is the file's tail past 90%: {got[:80]!r}")
        prompts = [os.path.join(d, f"p{i}.jsonl") for i in range(2)]
        for p in prompts:
            subprocess.run([sys.executable, HELD_OUT, "prompts", "--corpora", corpora, "--out", p, "--count", "3",
                            "--passage-chars", "100"], check=True, capture_output=True)
        lines = open(prompts[0]).read().splitlines()
        check(len(lines) == 3 and open(prompts[1]).read() == open(prompts[0]).read(), "3 prompts, reproducible")
        check(all("training" not in json.loads(x)["messages"][0]["content"] for x in lines),
              "prompts quote held-out text only")
    for f in failures:
        print("FAIL:", f)
    print("accuracy_report_test:", "FAILED" if failures else "passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

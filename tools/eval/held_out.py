#!/usr/bin/env python3
"""The held-out parts of the corpora as evaluation inputs (the rule of train/eagle3/data.py `split_text`: never
text the EAGLE-3 draft trained on).

  texts    each corpus's held-out text as OUT_DIR/NAME.txt (as in the file, whitespace kept): the windows of
           `specontext score` perplexity and recall (`bench/gpu_accuracy.sh` SPC_WINDOWS)
  prompts  a `specontext eval --fidelity` prompts file: seeded instructions to continue, summarise or answer
           about a held-out passage of about --passage-chars characters (docs/accuracy.md)

  python3 tools/eval/held_out.py texts --corpora ../shared/corpora --out held_out/
  python3 tools/eval/held_out.py prompts --corpora ../shared/corpora --out fidelity.jsonl --count 16
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_ruler_tasks import corpus_files, held_out_texts, load_split_text  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTRUCTIONS = [
    "Continue this text in the same style for as long as you can.",
    "Summarise the passage above, then retell it in your own words in detail.",
    "Write a long essay about the people, places and ideas in the passage above.",
    "Explain the passage above to a student, sentence by sentence.",
]


def write_texts(a):
    split_text = load_split_text(REPO)
    files = corpus_files(a.corpora, "held_out")
    os.makedirs(a.out, exist_ok=True)
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            _, held = split_text(f.read())
        name = os.path.splitext(os.path.basename(path))[0]
        with open(os.path.join(a.out, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(held)
        print(f"held_out: {name}.txt {len(held)} characters", file=sys.stderr)


def write_prompts(a):
    if a.count < 1 or a.passage_chars < 100:
        raise SystemExit("held_out: --count must be >= 1 and --passage-chars >= 100")
    texts = held_out_texts(a.corpora, load_split_text(REPO))
    names = sorted(n for n, t in texts.items() if len(t) > a.passage_chars)
    if not names:
        raise SystemExit(f"held_out: no held-out text longer than {a.passage_chars} characters")
    rng = random.Random(a.seed)
    with open(a.out, "w", encoding="utf-8") as f:
        for i in range(a.count):
            name = names[i % len(names)]
            text = texts[name]
            start = rng.randrange(len(text) - a.passage_chars)
            start = text.find(" ", start) + 1  # a whole word first
            passage = text[start:start + a.passage_chars].rsplit(" ", 1)[0]
            instruction = INSTRUCTIONS[i % len(INSTRUCTIONS)]
            line = {"id": f"fidelity-{i:03d}", "messages": [{"role": "user", "content": f"{passage}\n\n{instruction}"}],
                    "category": instruction.split()[0].lower(), "meta": {"corpus": name, "start": start}}
            f.write(json.dumps(line) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("texts")
    t.add_argument("--corpora", required=True)
    t.add_argument("--out", required=True)
    q = sub.add_parser("prompts")
    q.add_argument("--corpora", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--count", type=int, default=16)
    q.add_argument("--passage-chars", type=int, default=8000)
    q.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    (write_texts if a.cmd == "texts" else write_prompts)(a)


if __name__ == "__main__":
    main()

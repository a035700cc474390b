#!/usr/bin/env python3
"""Tests of tools/eval/make_ruler_tasks.py on a synthetic corpus: the output is byte-for-byte reproducible, every
task is well formed with its answers in its prompt, no text of the training part of a corpus reaches a prompt,
and --tokenizer-cmd sizes prompts to the target exactly (with a stand-in tokenizer speaking the protocol)."""
import json
import os
import random
import re
import string
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "eval", "make_ruler_tasks.py")
CATEGORIES = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]

# A stand-in for `specontext tokenize`: one token per 3 characters of the rendered message.
FAKE_TOKENIZER = r"""
import json, sys
for line in sys.stdin:
    m = json.loads(line)["messages"]
    print(json.dumps({"tokens": (len(m[0]["content"]) + 30) // 3}), flush=True)
"""


def write_corpus(root):
    # 90% training text marked "trainmark", then held-out text marked "heldmark" with a vocabulary of its own
    # (cwe draws its words from it). ASCII, so characters and bytes agree.
    rng = random.Random(5)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 9))) for _ in range(3000)]
    os.makedirs(os.path.join(root, "sub"))
    for name, n in [("a.txt", 4000), ("sub/b.txt", 3000)]:
        train = "".join(f"The trainmark sentence number {i} is here. " + ("\n" if i % 5 == 0 else "") for i in range(n))
        held_lines = "".join(f"A heldmark {rng.choice(words)} about the {rng.choice(words)} {i} goes on. " +
                             ("\n" if i % 5 == 0 else "") for i in range(n // 4))
        with open(os.path.join(root, name), "w") as f:
            f.write(train + "\n" + held_lines)


def run(args):
    r = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"make_ruler_tasks failed: {r.stderr}")
    return r


def main():
    with tempfile.TemporaryDirectory() as tmp:
        corpora = os.path.join(tmp, "corpora")
        write_corpus(corpora)
        out1, out2, out3 = (os.path.join(tmp, f"r{i}.jsonl") for i in range(3))
        common = ["--corpora", corpora, "--samples", "3", "--lengths", "512,1024", "--chars-per-token", "3.5"]
        run(common + ["--out", out1])
        run(common + ["--out", out2])
        assert open(out1, "rb").read() == open(out2, "rb").read(), "not reproducible"
        tasks = [json.loads(line) for line in open(out1)]
        trained, held = [], []
        for name in ("a.txt", "sub/b.txt"):
            text = open(os.path.join(corpora, name)).read()
            cut = text.find("\n", int(len(text) * 0.9)) + 1
            trained.append(re.sub(r"\s+", " ", text[:cut]))
            held.append(re.sub(r"\s+", " ", text[cut:]))
        assert len(tasks) == 7 * 2 * 3, len(tasks)
        assert len({t["id"] for t in tasks}) == len(tasks)
        for t in tasks:
            assert set(t) == {"id", "messages", "max_new_tokens", "answers", "scoring", "category", "length", "meta"}
            assert t["category"] in CATEGORIES and t["scoring"] == "contains_all"
            content = t["messages"][0]["content"]
            assert t["messages"][0]["role"] == "user"
            for a in t["answers"]:
                assert a and a in content, (t["id"], a)
            assert "trainmark" not in content.lower(), t["id"]
            # Held-out text only: every corpus sentence of the prompt lies after its file's 90% cut.
            for m in re.finditer(r"A heldmark \w+ about the \w+ \d+ goes on\.", content):
                assert any(m.group(0) in h for h in held) and not any(m.group(0) in tr for tr in trained), m.group(0)
            if t["category"] not in ("cwe", "fwe"):
                assert "heldmark" in content, t["id"]
            est = len(content) / 3.5
            assert est <= t["length"] - t["max_new_tokens"], (t["id"], est)
            assert t["meta"]["sized_by"] == "chars_per_token=3.5"
        # Exact sizing through the tokenizer protocol: 98-100% of length - max_new_tokens.
        run(["--corpora", corpora, "--samples", "2", "--lengths", "1024", "--out", out3,
             "--tokenizer-cmd", f"{sys.executable} -c '{FAKE_TOKENIZER}'"])
        for t in (json.loads(line) for line in open(out3)):
            target = t["length"] - t["max_new_tokens"]
            tokens = (len(t["messages"][0]["content"]) + 30) // 3
            assert t["meta"]["prompt_tokens"] == tokens and t["meta"]["sized_by"] == "tokenizer"
            assert 0.95 * target <= tokens <= target, (t["id"], tokens, target)
        # A bad category is refused.
        r = subprocess.run([sys.executable, SCRIPT, "--corpora", corpora, "--out", out3, "--categories", "qa"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "unknown category qa" in r.stderr, r.stderr
    print("make_ruler_tasks_test: ok")


if __name__ == "__main__":
    main()

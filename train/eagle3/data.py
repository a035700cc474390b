"""Training data for the EAGLE-3 draft: the public-domain corpora (../shared/corpora) split into a training
part and a held-out part, and the target's own answers to prompts made from the training part
(self-distillation, as EAGLE-3 trains on the target's outputs).

Held-out rule (the evaluation uses the same): of every corpus file, the text from the first newline at or
after 90% of its bytes to the end is held out and never trained on.
"""
import glob
import os
import random

HELD_OUT_FRACTION = 0.10


def corpus_files(root):
    files = sorted(glob.glob(os.path.join(root, "*.txt")) + glob.glob(os.path.join(root, "*", "*.txt")))
    if not files:
        raise SystemExit(f"no .txt corpora under {root}")
    return files


def split_text(text):
    """(training part, held-out part) of one corpus text."""
    cut = text.find("\n", int(len(text) * (1 - HELD_OUT_FRACTION)))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def load_corpora(root):
    """{name: (train_text, held_out_text)} for every corpus file."""
    out = {}
    for path in corpus_files(root):
        with open(path, encoding="utf-8", errors="replace") as f:
            out[os.path.relpath(path, root)] = split_text(f.read())
    return out


PROMPTS = [
    "Summarize the following passage in a few sentences.\n\n{passage}",
    "What happens in this passage, and who is involved?\n\n{passage}",
    "Rewrite this passage in plain modern English.\n\n{passage}",
    "Continue the following text for a few paragraphs in the same style.\n\n{passage}",
    "List the main ideas of this text.\n\n{passage}",
    "Explain this passage to a child.\n\n{passage}",
]


def make_prompts(train_texts, n, rng, passage_chars=(400, 2000)):
    """n chat prompts, each quoting a random passage of a training text."""
    prompts = []
    texts = list(train_texts)
    for _ in range(n):
        text = rng.choice(texts)
        length = rng.randint(*passage_chars)
        start = rng.randrange(0, max(1, len(text) - length))
        passage = text[start:start + length].strip()
        prompts.append(rng.choice(PROMPTS).format(passage=passage))
    return prompts


class Windows:
    """Random token windows of one length from token streams (one stream per corpus file)."""

    def __init__(self, streams, length, seed):
        self.streams = [s for s in streams if len(s) > length + 1]
        if not self.streams:
            raise SystemExit(f"no token stream is longer than {length}")
        self.weights = [len(s) for s in self.streams]
        self.length = length
        self.rng = random.Random(seed)

    def sample(self, batch):
        out = []
        for _ in range(batch):
            s = self.rng.choices(self.streams, weights=self.weights)[0]
            start = self.rng.randrange(0, len(s) - self.length)
            out.append(s[start:start + self.length])
        return out

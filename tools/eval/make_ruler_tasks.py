#!/usr/bin/env python3
"""RULER-style long-context tasks (arXiv 2404.06654) as a `specontext eval` task file (docs/accuracy.md).

Seeded and Python-stdlib only. Haystacks come from the held-out parts of the public-domain corpora (the text
from the first newline at or after 90% of each file: the rule of train/eagle3/data.py `split_text`, imported
from there when the repository is at hand, so evaluation never reads text the EAGLE-3 draft trained on).

Categories (RULER's definitions; the prompts are worded for an instruct model and sent as one user message):
  niah_single      one needle "One of the special magic numbers for KEY is: VALUE." in corpus text; asked for KEY
  niah_multikey    four needles with different keys, one asked for (three distractors)
  niah_multivalue  four values for one key, all asked for
  niah_multiquery  four keys, all asked for at once
  vt               variable tracking: a chain VAR A = 12345, VAR B = VAR A, ... (4 hops) hidden in corpus text;
                   asked for every variable holding the value
  cwe              common-words extraction: a numbered list of corpus words, 10 of them repeated freq_cw times,
                   the rest 3 times; asked for the 10 most common
  fwe              frequent-words extraction: coded 6-letter words drawn with Zipf(alpha=2) counts (the most
                   frequent one is the noise "..."); asked for the three most frequent
All are scored "contains_all" (RULER's string_match_all: the fraction of the expected strings in the output).

Lengths are total sequence lengths in the target's tokens (prompt + max_new_tokens <= length, as RULER counts).
Prompts are sized either exactly, with --tokenizer-cmd (a process speaking `specontext tokenize`'s protocol:
one JSON line in, {"tokens": N} out), or by characters with --chars-per-token (one factor, or one per category),
measured once on the target; each task's meta says which.

  python3 tools/eval/make_ruler_tasks.py --corpora ../shared/corpora --out ruler.jsonl \\
      --tokenizer-cmd "build/bin/specontext tokenize --model M.gguf"
"""
import argparse
import glob
import importlib.util
import json
import math
import os
import random
import re
import shlex
import string
import subprocess
import sys

CATEGORIES = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
# Tokens each category may generate (RULER's tokens_to_generate).
MAX_NEW_TOKENS = {"niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128,
                  "vt": 30, "cwe": 120, "fwe": 50}
HELD_OUT_FRACTION = 0.10
# Needle depths: 40 evenly spaced percentages of the haystack, as RULER places them.
DEPTHS = [round(100 * i / 39) for i in range(40)]

ADJECTIVES = """able acid aged airy amber ancient angry azure bald bare basic bitter black blond bold bored brave
brief bright broad brown busy calm cheap chief civil clean clever close cold cool coral crisp cruel curly damp dark
dear deep dense dizzy dry dull eager early eastern easy empty equal faint fair false fancy fast fierce firm flat fond
fresh frozen full gentle giant glad golden grand great green grey happy hard harsh heavy hidden high hollow honest
huge humble icy idle jolly keen kind large late lazy lean light little lively long loud lucky mad mellow mild
modern narrow neat noble odd old open pale plain polite proud quick quiet rapid rare raw ready red rich rough
round royal rural rusty sad safe salty sharp shiny short shy silent silver simple sleepy slow small smooth soft
solid sour spare steep stiff still stout strange strict strong sudden sunny sweet swift tall tame tender thick
thin tidy tiny tired tough true ugly upper urban vast violet vivid warm weak wealthy weary western wet white wide
wild wise witty wooden young""".split()
NOUNS = """acorn anchor apple arrow badge bakery balloon banner barrel basket beacon bench berry blanket board boat
bottle bracket branch bread bridge brush bucket button cabin cable camera candle canoe canvas carpet castle cellar
chair chalk cherry chimney circle cliff clock cloud coast collar comet copper cottage cradle crown curtain cushion
desert diamond doorway dragon drum eagle engine falcon feather fence fiddle field flag flute forest fountain
garden gate glacier glove harbor hammer harvest helmet hill honey horizon island jacket jewel kettle kitten ladder
lantern lemon library lily magnet maple marble meadow mirror monkey mountain needle nest ocean orchard oven paddle
palace parcel pebble pencil pepper piano pigeon pillow planet pocket pond puzzle quilt rabbit railway raven ribbon
river rocket saddle sail scarf shadow shelf shovel signal silk spoon spring statue stone storm stream sugar summit
teapot temple thunder ticket tiger timber tower trumpet tunnel valley velvet violin wagon walnut wand whistle
willow window winter wizard wolf""".split()


def load_split_text(repo_root):
    """train/eagle3/data.py's split_text when the repository is present (one rule for training and evaluation);
    otherwise the same rule restated here."""
    path = os.path.join(repo_root, "train", "eagle3", "data.py")
    if os.path.exists(path):
        spec = importlib.util.spec_from_file_location("eagle3_data", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.split_text

    def split_text(text):
        cut = text.find("\n", int(len(text) * (1 - HELD_OUT_FRACTION)))
        cut = len(text) if cut < 0 else cut + 1
        return text[:cut], text[cut:]
    return split_text


def corpus_files(root, prog="make_ruler_tasks"):
    """The .txt corpora under `root` and its subfolders, sorted; an error naming `prog` when there are none."""
    files = sorted(glob.glob(os.path.join(root, "*.txt")) + glob.glob(os.path.join(root, "*", "*.txt")))
    if not files:
        raise SystemExit(f"{prog}: no .txt corpora under {root}")
    return files


def held_out_texts(root, split_text):
    """{relative name: held-out text with whitespace runs collapsed to one space} of every corpus file."""
    out = {}
    for path in corpus_files(root):
        # Decoded as training decodes it, so the cut falls on the same character.
        with open(path, encoding="utf-8", errors="replace") as f:
            _, held = split_text(f.read())
        out[os.path.relpath(path, root)] = re.sub(r"\s+", " ", held).strip()
    return out


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?;])\s+", text) if s]


class Haystack:
    """Passages of held-out text and the vocabulary of the held-out parts."""

    def __init__(self, texts):
        self.texts = texts
        self.names = sorted(texts)
        words = set()
        for t in texts.values():
            words.update(w for w in re.findall(r"[a-z]+", t.lower()) if 4 <= len(w) <= 10)
        self.words = sorted(words)

    def passage(self, rng, chars):
        """About `chars` characters of held-out text: from a random sentence start of a random corpus, continued
        by the next corpus where it runs out. The start does not depend on `chars`, so a longer passage extends a
        shorter one (sizing searches on `chars`)."""
        i = rng.randrange(len(self.names))
        name, text = self.names[i], self.texts[self.names[i]]
        start = int(rng.random() * len(text))
        m = re.compile(r"[.!?]\s+(?=[A-Z\"'(])").search(text, start)
        start = m.end() if m else 0
        out = text[start:start + chars + 200]
        while len(out) < chars + 200:
            i = (i + 1) % len(self.names)
            out += " " + self.texts[self.names[i]][:chars + 200 - len(out)]
        # End on a sentence end in the last 5% of `chars`, else on a word boundary.
        cut = max(out.rfind(". ", 0, chars), out.rfind("? ", 0, chars), out.rfind("! ", 0, chars))
        if cut > chars * 19 // 20:
            return name, out[:cut + 1]
        space = out.rfind(" ", 0, chars)
        return name, out[:space] if space > 0 else out[:chars]


def random_key(rng):
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def number(rng, digits=7):
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def insert_needles(rng, text, needles):
    """Puts each needle between sentences at a depth drawn from DEPTHS; returns the text and the depths."""
    sents = sentences(text)
    depths = sorted(rng.sample(DEPTHS, len(needles)))
    cuts = [int(len(sents) * d / 100) for d in depths]
    out, last = [], 0
    for cut, needle in zip(cuts, needles):
        out.extend(sents[last:cut])
        out.append(needle)
        last = cut
    out.extend(sents[last:])
    return " ".join(out), depths


def make_niah(rng, hay, size, category):
    """size: haystack characters."""
    n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[category]
    n_values = 4 if category == "niah_multivalue" else 1
    n_queries = 4 if category == "niah_multiquery" else 1
    keys = []
    while len(keys) < n_keys:
        k = random_key(rng)
        if k not in keys:
            keys.append(k)
    values = [[number(rng) for _ in range(n_values)] for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    corpus, text = hay.passage(rng, size)
    context, depths = insert_needles(rng, text, needles)
    asked = rng.sample(range(n_keys), n_queries)
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(keys[i] for i in asked[:-1]) + (", and " if n_queries > 1 else "") + keys[asked[-1]]
    if len(answers) == 1:
        head = "A special magic number is hidden in the text below. Memorize it: you will be asked about it."
        question = f"What is the special magic number for {query} mentioned in the text above?"
    else:
        head = "Special magic numbers are hidden in the text below. Memorize them: you will be asked about them."
        question = f"What are all the special magic numbers for {query} mentioned in the text above?"
    return f"{head}\n\n{context}\n\n{question}", answers, {"corpus": corpus, "depths": depths, "keys": keys}


def make_vt(rng, hay, size, hops=4):
    """size: filler characters."""
    names = set()
    while len(names) < hops + 1:
        names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
    names = sorted(names)
    rng.shuffle(names)
    value = number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    corpus, text = hay.passage(rng, size)
    context, depths = insert_needles(rng, text, chain)  # sorted depths keep the chain in order
    prompt = ("Memorize and follow the chain of variable assignments hidden in the text below.\n\n"
              f"{context}\n\nQuestion: Which variables are assigned the value {value} in the text above, "
              "directly or through other variables? List all of them.")
    return prompt, names, {"corpus": corpus, "depths": depths}


def cwe_repeats(length):
    # RULER repeats the common words 30 times; shorter lists get proportionally fewer repeats so that the
    # common words stay a similar share of the list (8 at 1K, 15 at 2K).
    return max(6, min(30, round(30 * length / 4096)))


def make_cwe(rng, hay, size, length, n_common=10, rare_repeats=3):
    """size: number of list items."""
    common_repeats = cwe_repeats(length)
    n_rare = max(1, (size - n_common * common_repeats) // rare_repeats)
    # Words that are no substring of another chosen word, so that contains-scoring cannot credit a common word
    # for a listed rare word that contains it.
    pool = rng.sample(hay.words, min(len(hay.words), 4 * (n_common + n_rare) + 100))
    chosen = []
    for w in pool:
        if all(w not in c and c not in w for c in chosen):
            chosen.append(w)
        if len(chosen) == n_common + n_rare:
            break
    common, rare = chosen[:n_common], chosen[n_common:]
    items = common * common_repeats + rare * rare_repeats
    rng.shuffle(items)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    prompt = ("Below is a numbered list of words. Some words occur more often than others; remember which "
              f"occur most often.\n\n{listing}\n\nQuestion: Which {n_common} words occur most often in the list "
              "above?")
    return prompt, common, {"common_repeats": common_repeats, "rare_repeats": rare_repeats, "rare_words": len(rare)}


def make_fwe(rng, size, length, alpha=2.0, word_len=6):
    """size: number of coded words in the text."""
    vocab_size = max(8, length // 50)
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choice(string.ascii_lowercase) for _ in range(word_len)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent "word" is noise, as in RULER
    zeta = math.pi ** 2 / 6 if alpha == 2.0 else sum(k ** -alpha for k in range(1, 100000))
    words = [w for k, w in enumerate(vocab, 1) for _ in range(int(size * k ** -alpha / zeta))]
    rng.shuffle(words)
    prompt = ("Read the coded text below and keep count of how often each coded word occurs.\n\n"
              f"{' '.join(words)}\n\nQuestion: Ignore the dots '...'. Which three coded words occur most often in "
              "the coded text above? Do not explain.")
    return prompt, vocab[1:4], {"vocab_size": vocab_size, "words": len(words)}


def build(category, rng_seed, hay, size, length):
    rng = random.Random(rng_seed)
    if category.startswith("niah"):
        return make_niah(rng, hay, size, category)
    if category == "vt":
        return make_vt(rng, hay, size)
    if category == "cwe":
        return make_cwe(rng, hay, size, length)
    return make_fwe(rng, size, length)


class TokenCounter:
    """Token counts of prompts: exact through --tokenizer-cmd, or estimated from characters."""

    def __init__(self, cmd, chars_per_token):
        self.proc = None
        self.cpt = chars_per_token
        if cmd:
            self.proc = subprocess.Popen(shlex.split(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         encoding="utf-8", bufsize=1)

    def describe(self, category):
        return "tokenizer" if self.proc else f"chars_per_token={self.cpt[category]}"

    def count(self, category, prompt):
        if self.proc is None:
            return len(prompt) / self.cpt[category]
        self.proc.stdin.write(json.dumps({"messages": [{"role": "user", "content": prompt}]}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline() or '{"error": "the tokenizer command exited"}')
        if "tokens" not in reply:
            raise SystemExit(f"make_ruler_tasks: --tokenizer-cmd: {reply.get('error')}")
        return reply["tokens"]

    def close(self):
        if self.proc:
            self.proc.stdin.close()
            self.proc.wait()


def initial_size(category, target_tokens, cpt):
    """A first guess of the size parameter for `target_tokens` prompt tokens."""
    chars = target_tokens * cpt
    if category == "cwe":
        return int(chars / 9)  # "123. word " is about 9 characters
    if category == "fwe":
        return int(chars / 7)
    return int(chars * 0.97)


def sized_task(category, seed, hay, length, counter, cpt):
    """The largest task of `category` whose prompt fits length - max_new_tokens: secant steps on the size
    parameter, then bisection between the largest size that fits and the smallest that does not (passages end
    on sentence ends, so tokens grow in steps)."""
    target = length - MAX_NEW_TOKENS[category]
    size = max(16, initial_size(category, target, cpt))
    fits, over = None, None  # (size, prompt, answers, meta, tokens)
    for _ in range(24):
        prompt, answers, meta = build(category, seed, hay, size, length)
        tokens = counter.count(category, prompt)
        if tokens <= target:
            if fits is None or size > fits[0]:
                fits = (size, prompt, answers, meta, tokens)
        elif over is None or size < over[0]:
            over = (size, prompt, answers, meta, tokens)
        if target * 0.98 <= tokens <= target:
            break
        if fits is not None and over is not None:
            size = (fits[0] + over[0]) // 2
            if size == fits[0]:
                break
        else:
            size = max(16, int(size * (target * 0.99 / max(tokens, 1))))
    if fits is None or fits[4] < 0.9 * target:
        got = "none" if fits is None else f"{fits[4]:.0f} tokens at most"
        raise SystemExit(f"make_ruler_tasks: cannot size a {category} prompt to {target} tokens ({got}): "
                         "too little held-out text or vocabulary?")
    return fits[1:]


def parse_cpt(text):
    if "=" not in text:
        return {c: float(text) for c in CATEGORIES}
    out = {}
    for part in text.split(","):
        name, value = part.split("=")
        if name not in CATEGORIES:
            raise SystemExit(f"make_ruler_tasks: --chars-per-token: unknown category {name}")
        out[name] = float(value)
    missing = [c for c in CATEGORIES if c not in out]
    if missing:
        raise SystemExit(f"make_ruler_tasks: --chars-per-token lacks {', '.join(missing)}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", required=True, help="folder of .txt corpora (../shared/corpora)")
    p.add_argument("--out", required=True, help="task file to write (JSON Lines)")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="total tokens per task (prompt + answer)")
    p.add_argument("--samples", type=int, default=50, help="tasks per category and length")
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-cmd", help="command speaking `specontext tokenize`'s protocol (exact sizes)")
    p.add_argument("--chars-per-token", default="4.0",
                   help="size by characters: one factor or CATEGORY=F,... for all categories (ignored with "
                        "--tokenizer-cmd except as the first guess)")
    a = p.parse_args()
    cats = a.categories.split(",")
    for c in cats:
        if c not in CATEGORIES:
            raise SystemExit(f"make_ruler_tasks: unknown category {c} ({', '.join(CATEGORIES)})")
    lengths = [int(x) for x in a.lengths.split(",")]
    if any(n <= max(MAX_NEW_TOKENS.values()) + 64 for n in lengths) or a.samples < 1:
        raise SystemExit("make_ruler_tasks: lengths must exceed 192 tokens and --samples be positive")
    cpt = parse_cpt(a.chars_per_token)
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    hay = Haystack(held_out_texts(a.corpora, load_split_text(repo_root)))
    counter = TokenCounter(a.tokenizer_cmd, cpt)
    n = 0
    with open(a.out, "w", encoding="utf-8") as out:
        for category in cats:
            for length in lengths:
                fill = []
                for i in range(a.samples):
                    seed = f"{a.seed}:{category}:{length}:{i}"
                    prompt, answers, meta, tokens = sized_task(category, seed, hay, length, counter, cpt[category])
                    meta.update({"seed": seed, "prompt_tokens": round(tokens), "sized_by": counter.describe(category)})
                    task = {"id": f"{category}-{length}-{i:03d}",
                            "messages": [{"role": "user", "content": prompt}],
                            "max_new_tokens": MAX_NEW_TOKENS[category],
                            "answers": answers,
                            "scoring": "contains_all",
                            "category": category,
                            "length": length,
                            "meta": meta}
                    out.write(json.dumps(task, ensure_ascii=False) + "\n")
                    fill.append(tokens / (length - MAX_NEW_TOKENS[category]))
                    n += 1
                print(f"make_ruler_tasks: {category} {length}: {a.samples} tasks, prompt/target "
                      f"{min(fill):.3f}..{max(fill):.3f} ({counter.describe(category)})", file=sys.stderr)
    counter.close()
    print(f"make_ruler_tasks: wrote {n} tasks to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

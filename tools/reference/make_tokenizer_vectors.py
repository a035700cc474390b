#!/usr/bin/env python3
"""Writes the golden tokenizer vectors the C++ test tests/tokenizer/hf_vectors_test.cc compares with.

Runs where Python has HF `tokenizers` (the GPU machine). For each tokenizer folder and each line of
tests/tokenizer/strings.jsonl ({"text": ...} or {"hex": ...}; hex bytes are decoded with
errors='replace', which is also what our C++ Encode does with invalid UTF-8) it writes one line
  {"ids": [...], "decoded": ..., "decoded_skip": ...}
to tests/data/tokenizers/expected_<name>.jsonl, where
  ids          = Tokenizer.from_file(tokenizer.json).encode(text, add_special_tokens=False).ids
  decoded      = decode(ids, skip_special_tokens=False)
  decoded_skip = decode(ids, skip_special_tokens=True)

Usage (from the repository root):
  python3 tools/reference/make_tokenizer_vectors.py \
      --tokenizers_dir <dir with llama3/ and qwen3/> [--strings tests/tokenizer/strings.jsonl] \
      [--out_dir tests/data/tokenizers]
The tokenizer folders come from tests/data/tokenizers/hf_tokenizers.tar.xz; without --tokenizers_dir
the script unpacks that archive to a temporary folder itself.
"""
import argparse
import json
import os
import sys
import tarfile
import tempfile

from tokenizers import Tokenizer, __version__ as tokenizers_version


def read_strings(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            o = json.loads(line)
            if "hex" in o:
                out.append(bytes.fromhex(o["hex"]).decode("utf-8", errors="replace"))
            else:
                out.append(o["text"])
    return out


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizers_dir", default=None)
    ap.add_argument("--strings", default=os.path.join(root, "tests/tokenizer/strings.jsonl"))
    ap.add_argument("--out_dir", default=os.path.join(root, "tests/data/tokenizers"))
    ap.add_argument("--names", default="qwen3,llama3")
    args = ap.parse_args()

    tmp = None
    tok_dir = args.tokenizers_dir
    if tok_dir is None:
        tmp = tempfile.TemporaryDirectory()
        with tarfile.open(os.path.join(root, "tests/data/tokenizers/hf_tokenizers.tar.xz")) as tar:
            tar.extractall(tmp.name)
        tok_dir = tmp.name

    strings = read_strings(args.strings)
    print(f"tokenizers {tokenizers_version}: {len(strings)} strings", file=sys.stderr)
    for name in args.names.split(","):
        tok = Tokenizer.from_file(os.path.join(tok_dir, name, "tokenizer.json"))
        path = os.path.join(args.out_dir, f"expected_{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for text in strings:
                ids = tok.encode(text, add_special_tokens=False).ids
                rec = {
                    "ids": ids,
                    "decoded": tok.decode(ids, skip_special_tokens=False),
                    "decoded_skip": tok.decode(ids, skip_special_tokens=True),
                }
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"wrote {path}", file=sys.stderr)
        # The known anchor from the tokenizer's README.
        if name == "qwen3":
            got = tok.encode("Hello, my dog is cute", add_special_tokens=False).ids
            assert got == [9707, 11, 847, 5562, 374, 18838], got
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

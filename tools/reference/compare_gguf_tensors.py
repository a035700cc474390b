#!/usr/bin/env python3
"""Compares the engine's GGUF loading with HF transformers', tensor by tensor.

The engine side is a dump of what its WeightSource returns (HF names and layout, quantized tensors
dequantized to f32, the llama q/k permutation undone), written by
    build-cpu/bin/specontext-dump-weights --model=MODEL.gguf --out=DUMP.safetensors
The reference is AutoModelForCausalLM.from_pretrained(dir, gguf_file=...), which dequantizes with the
gguf package and un-permutes q/k itself. Prints, per tensor kind, the number of tensors and the largest
absolute difference; exits non-zero when a tensor is missing, has another shape, or differs by more than
--atol. Needs torch, transformers, gguf, numpy, safetensors (not the project's runtime).

    python3 tools/reference/compare_gguf_tensors.py --gguf MODEL.gguf --dump DUMP.safetensors
"""
import argparse
import collections
import pathlib
import re
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def kind(name):
    return re.sub(r"\.layers\.\d+\.", ".layers.N.", name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--dump", required=True)
    ap.add_argument("--atol", type=float, default=0.0)
    args = ap.parse_args()
    path = pathlib.Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref = model.state_dict()
    ours = load_file(args.dump)
    if model.config.tie_word_embeddings and "lm_head.weight" not in ours:
        ours["lm_head.weight"] = ours["model.embed_tokens.weight"]  # tied: the engine reuses the embedding
    worst = collections.defaultdict(lambda: [0, 0.0])
    failures = []
    for name, want in ref.items():
        if name not in ours:
            failures.append(f"{name}: missing from the dump")
            continue
        got = ours[name].to(torch.float32)
        if tuple(got.shape) != tuple(want.shape):
            failures.append(f"{name}: shape {tuple(got.shape)} vs HF {tuple(want.shape)}")
            continue
        diff = (got - want.to(torch.float32)).abs().max().item()
        entry = worst[kind(name)]
        entry[0] += 1
        entry[1] = max(entry[1], diff)
        if diff > args.atol:
            failures.append(f"{name}: max |ours - HF| = {diff:.3g}")
    extra = sorted(set(ours) - set(ref))
    print(f"{'tensor kind':<52} {'count':>5}  max |ours - HF|")
    for k in sorted(worst):
        print(f"{k:<52} {worst[k][0]:>5}  {worst[k][1]:.3g}")
    print(f"{len(ref)} HF tensors compared, {len(extra)} extra in the dump {extra[:5]}")
    for f in failures[:20]:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

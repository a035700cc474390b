#!/usr/bin/env python3
"""Golden logits from HF transformers for the tiny random checkpoints in tests/data/tiny/.

Run on the GPU machine (its Python has torch + transformers):
    python3 tools/reference/make_logits_reference.py tests/data/tiny OUT_DIR
For each checkpoint folder it loads the files with from_pretrained (f32, eager attention), runs
a fixed token sequence and writes OUT_DIR/<name>.json: {"tokens": [...], "vocab": V,
"logits": flat f32 list [T * V]} plus transformers/torch versions.
"""
import json
import os
import random
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            continue
        model = AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, attn_implementation="eager").eval()
        vocab = model.config.vocab_size
        rng = random.Random(1234)
        tokens = [rng.randrange(vocab) for _ in range(24)]
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0].float()
        json.dump({"name": name, "tokens": tokens, "vocab": vocab,
                   "transformers": transformers.__version__, "torch": torch.__version__,
                   "logits": [round(float(x), 7) for x in logits.flatten().tolist()]},
                  open(os.path.join(out, name + ".json"), "w"))
        print(name, tuple(logits.shape), float(logits.abs().max()))


if __name__ == "__main__":
    main()

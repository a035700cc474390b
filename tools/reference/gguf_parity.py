#!/usr/bin/env python3
"""HF transformers parity for a GGUF model: teacher-forced logits of HF vs `specontext score`.

  reference: HF loads the GGUF (from_pretrained(dir, gguf_file=...), f32), tokenizes a text with the GGUF's
             tokenizer, and writes OUT/ids.json (the token ids) and OUT/hf_logits.npy [n-1, vocab] (row i:
             the logits after tokens[0..i], predicting tokens[i+1]); with --golden FILE also a small golden
             file (top-20 logits of the first --golden-positions rows) for the CPU test in CI.
  compare:   reads OUT/hf_logits.npy and `specontext score --token-ids OUT/ids.json --logits-out OURS.npy`'s
             file and prints, per bucket of the predicted token's position, top-1 agreement (argmax equal),
             mean KL(HF || ours) and the largest logit difference.

    python3 tools/reference/gguf_parity.py reference --gguf M.gguf --text T.txt --tokens 8192 --out DIR
    build/bin/specontext score --model M.gguf --token-ids DIR/ids.json --logits-out DIR/ours.npy
    python3 tools/reference/gguf_parity.py compare --ref DIR --ours DIR/ours.npy --buckets 1024,4096
"""
import argparse
import json
import os
import sys

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")


def reference(a):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation=a.attn).to(a.device).eval()
    text = open(a.text, encoding="utf-8").read()[a.offset:]
    ids = tok(text, add_special_tokens=True)["input_ids"][: a.tokens]
    if len(ids) < a.tokens:
        sys.exit(f"the text gives only {len(ids)} tokens, fewer than --tokens {a.tokens}")
    os.makedirs(a.out, exist_ok=True)
    json.dump({"tokens": ids, "gguf": name, "transformers": transformers.__version__, "torch": torch.__version__},
              open(os.path.join(a.out, "ids.json"), "w"))
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=a.device)).logits[0, :-1].float().cpu().numpy()
    np.save(os.path.join(a.out, "hf_logits.npy"), logits)
    print(f"reference: {len(ids)} tokens, logits {logits.shape}, transformers {transformers.__version__}")
    if a.golden:
        k, n = 20, a.golden_positions
        top = np.argsort(-logits[:n], axis=1)[:, :k]
        json.dump({"gguf": name, "gguf_sha256": a.gguf_sha256, "transformers": transformers.__version__,
                   "torch": torch.__version__, "note": "row i: HF's top-20 logits after tokens[0..i] (f32, eager)",
                   "tokens": ids[: n + 1], "top_ids": top.tolist(),
                   "top_logits": [[round(float(logits[i, j]), 5) for j in row] for i, row in enumerate(top)]},
                  open(a.golden, "w"), separators=(",", ":"))
        print(f"golden: {a.golden} ({n} positions)")


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def compare(a):
    hf = np.load(os.path.join(a.ref, "hf_logits.npy"), mmap_mode="r")
    ours = np.load(a.ours, mmap_mode="r")
    n = min(len(hf), len(ours))
    if len(hf) != len(ours):
        print(f"note: comparing the first {n} rows (hf {len(hf)}, ours {len(ours)})")
    edges = [int(e) for e in a.buckets.split(",")] if a.buckets else []
    # Row i predicts the token at position i + 1.
    bounds = [0] + edges + [n + 1]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        r0, r1 = max(lo - 1, 0), min(hi - 1, n)
        if r1 <= r0:
            continue
        agree = kl = 0.0
        max_diff = 0.0
        for c0 in range(r0, r1, 256):
            c1 = min(c0 + 256, r1)
            h = np.asarray(hf[c0:c1], dtype=np.float64)
            o = np.asarray(ours[c0:c1], dtype=np.float64)
            agree += float((h.argmax(1) == o.argmax(1)).sum())
            lh, lo_ = log_softmax(h), log_softmax(o)
            kl += float((np.exp(lh) * (lh - lo_)).sum())
            max_diff = max(max_diff, float(np.abs(h - o).max()))
        cnt = r1 - r0
        rows.append({"positions": f"{lo}-{hi if hi <= n else n}", "tokens": cnt, "top1_agreement": agree / cnt,
                     "kl_mean": kl / cnt, "max_abs_logit_diff": max_diff})
    out = {"rows": n, "buckets": rows}
    print(json.dumps(out, indent=1))
    if a.json_out:
        json.dump(out, open(a.json_out, "w"), indent=1)
    worst = min(r["top1_agreement"] for r in rows)
    if a.min_top1 and worst < a.min_top1:
        sys.exit(f"top-1 agreement {worst:.4f} below {a.min_top1}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference")
    r.add_argument("--gguf", required=True)
    r.add_argument("--gguf-sha256", default="")
    r.add_argument("--text", required=True)
    r.add_argument("--offset", type=int, default=0, help="characters of the text to skip")
    r.add_argument("--tokens", type=int, required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--device", default="cpu")
    r.add_argument("--attn", default="sdpa", help="eager or sdpa")
    r.add_argument("--golden", default="")
    r.add_argument("--golden-positions", type=int, default=256)
    c = sub.add_parser("compare")
    c.add_argument("--ref", required=True)
    c.add_argument("--ours", required=True)
    c.add_argument("--buckets", default="")
    c.add_argument("--json-out", default="")
    c.add_argument("--min-top1", type=float, default=0.0)
    a = p.parse_args()
    reference(a) if a.cmd == "reference" else compare(a)


if __name__ == "__main__":
    main()

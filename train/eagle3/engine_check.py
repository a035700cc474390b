#!/usr/bin/env python3
"""Checks this package's mirror of the retrieval head and of selection against the engine: the engine's sparse
teacher-forced logits (`specontext score --sparse`, every token after the first a decode step) next to HF's
target decoding step by step with attention restricted to the sets the mirror selects (attn.py), the head fed
the hidden states of those sparse steps as the engine feeds it. If the mirror is right, the two sparse runs
differ only by the engine/HF numerical gap (the dense run measures that gap); a wrong head or rule gives
differences of the size of sparse-vs-dense itself.

  python3 train/eagle3/engine_check.py --gguf M.gguf --head HEAD_DIR --corpora C --specontext build/bin/specontext \\
      --tokens 384 --budget 32
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn import NEG, _with_sink, head_group_logits, head_qk  # noqa: E402
from data import load_corpora  # noqa: E402
from recall import load_head  # noqa: E402
from train import load_target  # noqa: E402


class SparseAttention:
    """A registered attention function: with `allowed` [kv, T] set (one new token), the new token attends only to
    the allowed cache positions; otherwise causal sdpa (the prefill, where every past position fits B)."""

    NAME = "spc_sparse_check"

    def __init__(self, model):
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        self.allowed = None

        def attention(module, query, key, value, attention_mask, **kwargs):
            if self.allowed is not None:
                groups = module.num_key_value_groups
                mask = self.allowed.repeat_interleave(groups, 0)[None, :, None, :]   # [1, heads, 1, T]
                attention_mask = torch.where(mask, 0.0, float("-inf")).to(query.dtype)
            return sdpa(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.NAME, attention)
        AttentionMaskInterface.register(self.NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        model.set_attn_implementation(self.NAME)


def kl_rows(p_logits, q_logits):
    """KL(p || q) per row of two [n, V] logit arrays."""
    lp = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.no_grad()
def mirror_sparse(target, draft, fusion, yarn, ids, budget, sink):
    """HF logits [N-1, V] of positions 0..N-2 (each predicting the next token) decoded with the mirror's sets,
    and the number of (step, KV head) sets that were sparse."""
    from transformers import DynamicCache
    N = len(ids)
    sp = SparseAttention(target)
    x = torch.as_tensor([ids])
    emb = target.get_input_embeddings()(x).float()
    cos, sin = draft.rope(N, "cpu", yarn)
    cache = DynamicCache()
    n0 = min(N, budget + 1)          # positions 0..budget: every past fits the budget, one dense prefill
    out = target(x[:, :n0], past_key_values=cache, use_cache=True, output_hidden_states=True)
    logits = [out.logits[0].float()]
    feats = [torch.cat([out.hidden_states[f][0] for f in fusion], -1).float()]   # rows = positions
    for t in range(n0, N):
        g = torch.cat(feats, 0)[:t]                                                # positions 0..t-1
        h = draft.fc(g)
        h = torch.cat([torch.zeros_like(h[:1]), h], 0)[None]                     # position p reads p-1
        idx = torch.tensor([[t]])
        q, k = head_qk(draft, emb[:, :t + 1], h, idx, cos[:t + 1], sin[:t + 1])
        z = head_group_logits(q, k[:, :, :t], idx)                               # past 0..t-1
        sets = _with_sink(z, idx, sink).topk(budget, -1).indices[0, :, 0]        # [kv, B]
        allowed = torch.zeros(k.shape[1], t + 1, dtype=torch.bool)
        allowed.scatter_(1, sets, True)
        allowed[:, t] = True                                                      # the current token
        sp.allowed = allowed
        out = target(x[:, t:t + 1], past_key_values=cache, use_cache=True, output_hidden_states=True)
        sp.allowed = None
        logits.append(out.logits[0].float())
        feats.append(torch.cat([out.hidden_states[f][0] for f in fusion], -1).float())
    return torch.cat(logits, 0)[:N - 1], max(0, N - n0)


def engine_logits(binary, gguf, ids, head, budget, sink, threads):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "ids.json"), "w") as f:
            json.dump(ids, f)
        cmd = [binary, "score", "--model", gguf, "--token-ids", os.path.join(d, "ids.json"), "--backend", "cpu",
               "--threads", str(threads), "--logits-out", os.path.join(d, "l.npy")]
        if head:
            cmd += ["--sparse", "--retrieval-head", head, "--budget", str(budget), "--sink", str(sink)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{' '.join(cmd)}: {run.stderr[-2000:]}")
        return np.load(os.path.join(d, "l.npy")), json.loads(run.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True)
    p.add_argument("--head", required=True, help="a head pruned by `specontext prune --kind eagle3`")
    p.add_argument("--corpora", required=True)
    p.add_argument("--specontext", required=True, help="the engine's binary (a CPU build)")
    p.add_argument("--tokens", type=int, default=384)
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--sink", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    tok, target = load_target(a.gguf, "cpu")
    held = next(h for name, (_, h) in load_corpora(a.corpora).items() if "persuasion" in name)
    ids = tok(held, add_special_tokens=False)["input_ids"][:a.tokens]
    draft, fusion, _, yarn = load_head(a.head, "cpu")

    with torch.no_grad():
        hf_dense = target(torch.as_tensor([ids])).logits[0, :-1].float()
    ours, n_sparse = mirror_sparse(target, draft, fusion, yarn, ids, a.budget, a.sink)
    eng_dense, _ = engine_logits(a.specontext, a.gguf, ids, None, a.budget, a.sink, a.threads)
    eng_sparse, summary = engine_logits(a.specontext, a.gguf, ids, a.head, a.budget, a.sink, a.threads)
    n = min(len(eng_sparse), len(ours))
    late = slice(a.budget + 1, n)                      # the steps where selection drops tokens
    rows = {
        "engine dense vs HF dense (numerical gap)": kl_rows(eng_dense[:n], hf_dense[:n]),
        "engine sparse vs HF dense (what sparsity costs)": kl_rows(eng_sparse[:n], hf_dense[:n]),
        "engine sparse vs mirror sparse (this check)": kl_rows(eng_sparse[:n], ours[:n].numpy()),
    }
    res = {"tokens": len(ids), "budget": a.budget, "sparse_steps": n_sparse, "engine_summary_ppl": summary.get("perplexity")}
    for name, kl in rows.items():
        res[name] = {"kl_mean_sparse_steps": round(float(kl[late].mean()), 5),
                     "kl_max_sparse_steps": round(float(kl[late].max()), 5)}
    a_eng = eng_sparse[:n].argmax(-1)
    res["top1_agreement_engine_sparse_vs_mirror_sparse"] = round(float((a_eng[late] == ours[:n].argmax(-1).numpy()[late]).mean()), 4)
    res["top1_agreement_engine_sparse_vs_hf_dense"] = round(float((a_eng[late] == hf_dense[:n].argmax(-1).numpy()[late]).mean()), 4)
    nll = lambda lg: float(-torch.log_softmax(torch.as_tensor(lg[late], dtype=torch.float64), -1)[  # noqa: E731
        torch.arange(late.stop - late.start), torch.as_tensor(ids[late.start + 1:n + 1])].mean())
    res["perplexity_sparse_steps"] = {"hf_dense": round(math.exp(nll(hf_dense.numpy())), 3),
                                      "engine_sparse": round(math.exp(nll(eng_sparse)), 3),
                                      "mirror_sparse": round(math.exp(nll(ours.numpy())), 3)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

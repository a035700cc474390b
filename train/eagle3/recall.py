#!/usr/bin/env python3
"""Attention recall of retrieval heads on held-out windows of the corpora (data.py's rule), next to the window
and oracle sets; attn.recall_eval defines the measure. The windows and query positions are those of
train.py's final recall at the same length. A head is either

- a draft in SpecForge's layout (as train.py writes it): --yarn auto stretches one trained at fewer positions
  than the target's context with YaRN, as `specontext prune --yarn-factor auto` does (factor = target context
  / the draft's max_position_embeddings); or
- a head pruned by `specontext prune --kind eagle3` (config.json with specontext_retrieval_head): its own
  RoPE (YaRN included) is used, so this measures exactly what the engine runs.

  python3 train/eagle3/recall.py --gguf M.gguf --corpora C --draft OUT_A/draft --draft HEAD_DIR \\
      --seq-len 8192 --out recall.jsonl
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn import TargetCapture, recall_eval  # noqa: E402
from data import Windows, load_corpora  # noqa: E402
from draft import Eagle3Draft  # noqa: E402
from train import load_target, log  # noqa: E402


# A pruned head's tensors (core/sparse/retrieval_head_prune.cc) and where the draft keeps them.
HEAD_TENSORS = {"fc.weight": "fc.weight", "hidden_norm.weight": "midlayer.hidden_norm.weight",
                "input_layernorm.weight": "midlayer.input_layernorm.weight",
                "q_proj.weight": "midlayer.self_attn.q_proj.weight", "k_proj.weight": "midlayer.self_attn.k_proj.weight"}


def load_head(path, device):
    """(draft module, fusion layer inputs, trained positions, YaRN of a pruned head or None)."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "rope_theta", "vocab_size")
    c = {k: cfg[k] for k in keys}
    tensors = {k: v.float() if v.is_floating_point() else v
               for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    meta = cfg.get("specontext_retrieval_head")
    if meta is None:
        d2t = tensors["d2t"].long()
        draft = Eagle3Draft(c, (d2t + torch.arange(len(d2t))).tolist())
        draft.load_state_dict(tensors)
        fusion = [i + 1 for i in cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
        return draft.to(device).eval(), fusion, cfg.get("max_position_embeddings"), None
    if meta.get("kind") != "eagle3" or set(tensors) != set(HEAD_TENSORS):
        raise SystemExit(f"{path}: only eagle3 heads without biases or extra norms are mirrored here "
                         f"(tensors {sorted(tensors)})")
    draft = Eagle3Draft(c, [0])                     # the LM head, v/o and MLP are not part of a pruned head
    state = draft.state_dict()
    state.update({HEAD_TENSORS[k]: v for k, v in tensors.items()})
    draft.load_state_dict(state)
    rs = cfg.get("rope_scaling") or {}
    yarn = None
    if rs:
        if rs.get("rope_type", rs.get("type")) != "yarn" or rs.get("attention_factor"):
            raise SystemExit(f"{path}: rope_scaling {rs} is not mirrored here (plain YaRN only)")
        yarn = (rs["factor"], rs["original_max_position_embeddings"], rs.get("beta_fast", 32.0),
                rs.get("beta_slow", 1.0))
    return draft.to(device).eval(), meta["fusion_layers"], cfg.get("max_position_embeddings"), yarn


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True)
    p.add_argument("--corpora", required=True)
    p.add_argument("--draft", action="append", required=True, help="a draft directory (repeatable)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--budgets", default="128,256,512,1024,2048")
    p.add_argument("--sink", type=int, default=1)
    p.add_argument("--yarn", default="auto", help="for drafts: auto, none, or a factor")
    p.add_argument("--out", default="", help="JSON lines, one per draft (default: stdout only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()

    tok, target = load_target(a.gguf, a.device)
    held = [tok(h, add_special_tokens=False)["input_ids"] for _, h in load_corpora(a.corpora).values()]
    windows = Windows(held, a.seq_len, 778).sample(a.windows)
    cap = TargetCapture(target)
    budgets = [int(b) for b in a.budgets.split(",")]
    out = open(a.out, "w") if a.out else None
    for path in a.draft:
        draft, fusion, trained, yarn = load_head(path, a.device)   # a pruned head's YaRN is the engine's
        if yarn is None and a.yarn == "auto":
            factor = target.config.max_position_embeddings / (trained or a.seq_len)
            yarn = (factor, trained) if factor > 1 else None
        elif yarn is None and a.yarn != "none":
            yarn = (float(a.yarn), trained or a.seq_len)
        r = recall_eval(target, cap, draft, fusion, windows, a.queries, budgets, a.sink, yarn, seed=2)
        r["draft"] = path
        log(f"{path}: " + json.dumps(r["mean"]))
        if out:
            out.write(json.dumps(r) + "\n")
            out.flush()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Trains an EAGLE-3 draft for a target model given as a GGUF file (SmolLM2-135M-Instruct here) and writes it
in SpecForge's published layout (config.json with eagle_config, model.safetensors with d2t/t2d), ready for
`specontext prune --kind eagle3`. Runs on the GPU machine in one call; see README.md for the recipe.

  python3 train/eagle3/train.py --gguf M.gguf --corpora ../shared/corpora --out OUT --seq-len 2048 --steps 1500
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn import (TargetCapture, distill_loss, head_group_logits, head_qk, recall_eval,  # noqa: E402
                  sample_queries, target_distribution)
from data import Windows, load_corpora, make_prompts  # noqa: E402
from draft import Eagle3Draft, init_weights  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@functools.lru_cache(maxsize=1)  # ab.py trains several variants in one process: load once
def load_target(gguf, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    # bf16 on the GPU; on the CPU (tests) f32, which its kernels run much faster.
    dtype = torch.float32 if str(device) == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


@torch.no_grad()
def self_distill(tok, target, prompts, max_new, batch, device, seed):
    """The target's sampled answers to `prompts` (chat template), as token lists of prompt + answer."""
    torch.manual_seed(seed)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    for i in range(0, len(prompts), batch):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = target.generate(**enc, max_new_tokens=max_new, do_sample=True, temperature=0.7, top_p=0.9,
                              pad_token_id=tok.pad_token_id)
        for row, mask in zip(gen, enc["attention_mask"]):
            ids = row[int((mask == 0).sum()):].tolist()  # drop left padding
            while ids and ids[-1] == tok.pad_token_id:
                ids.pop()
            out.append(ids)
    return out


def draft_vocabulary(streams, size, vocab):
    counts = torch.zeros(vocab, dtype=torch.long)
    for s in streams:
        counts += torch.bincount(torch.as_tensor(s, dtype=torch.long), minlength=vocab)
    return sorted(torch.argsort(counts, descending=True)[:size].tolist())


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    frac = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def run_batch(tokens, target, draft, fusion, a, cap=None):
    """Draft losses and top-1 agreements per training-time-test step on one batch of token windows; with
    `cap` (attn.TargetCapture) also the attention-distillation loss and KL(P || Q) of the retrieval head."""
    ids = torch.as_tensor(tokens, device=a.device)
    idx = sample_queries(ids.shape[0], ids.shape[1], a.attn_queries, a.attn_sink + 1, a.device) if cap else None
    with torch.no_grad():
        with cap.capture(idx) if cap else contextlib.nullcontext():
            out = target(ids, output_hidden_states=True)
        g = torch.cat([out.hidden_states[f] for f in fusion], dim=-1)           # [B, T, 3H]
        tlogits = out.logits[:, 1:]                                              # predicts x_{t+1}
        p = torch.softmax(tlogits[..., draft.draft_ids].float(), dim=-1)         # over the draft vocabulary
        full_argmax = tlogits.argmax(-1)
        emb_all = target.get_input_embeddings()(ids)
        emb = emb_all[:, 1:]
        if cap:
            P = target_distribution(cap, idx, a.attn_agg)
            cap.clear()
    T = ids.shape[1] - 1
    cos, sin = draft.rope(T, ids.device)
    attn_terms = None
    with torch.autocast("cuda" if ids.is_cuda else "cpu", dtype=torch.bfloat16, enabled=a.bf16):
        h_in = draft.fc(g[:, :-1])
        if cap:
            # The retrieval head's view (step 0, the target's real features): position t pairs x_t with the
            # features of t-1, the first token with zeros, RoPE at t; see attn.head_qk.
            h_full = torch.cat([torch.zeros_like(h_in[:, :1]), h_in], dim=1)
            cos_f, sin_f = draft.rope(T + 1, ids.device)
            q, k = head_qk(draft, emb_all, h_full, idx, cos_f, sin_f)
            attn_terms = distill_loss(P, head_group_logits(q, k, idx), idx, a.attn_sink, a.attn_loss, a.attn_topk)
        losses, agree = [], []
        for k in range(a.ttt):
            h_out, logits = draft.step(emb, h_in, cos, sin)
            logp = F.log_softmax(logits.float(), dim=-1)
            losses.append(-(p * logp).sum(-1).mean())
            agree.append((draft.draft_ids[logits.argmax(-1)] == full_argmax).float().mean())
            # Training-time test: the next step reads the draft's own hidden state of the previous position
            # where step 0 read the target's features, as drafting several tokens ahead does.
            h_in = torch.cat([torch.zeros_like(h_out[:, :1]), h_out[:, :-1]], dim=1)
    return losses, agree, attn_terms


@torch.no_grad()
def evaluate(windows, target, draft, fusion, a, batches):
    draft.eval()
    tot = [0.0] * a.ttt
    for _ in range(batches):
        _, agree, _ = run_batch(windows.sample(a.batch), target, draft, fusion, a)
        for k in range(a.ttt):
            tot[k] += float(agree[k]) / batches
    draft.train()
    return tot


def save_specforge(draft, c, fusion, a, out_dir):
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous().cpu()
               for k, v in draft.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
        "num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"],
        "head_dim": c["head_dim"], "num_hidden_layers": 1, "rms_norm_eps": c["rms_norm_eps"],
        "rope_theta": c["rope_theta"], "max_position_embeddings": a.seq_len, "rope_scaling": None,
        "vocab_size": c["vocab_size"], "draft_vocab_size": len(draft.draft_ids), "hidden_act": "silu",
        "tie_word_embeddings": False,
        # SpecForge names the layers whose OUTPUT is fused; the input of layer f is the output of f - 1.
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [f - 1 for f in fusion], "use_aux_hidden_state": True,
                         "use_input_layernorm_in_first_layer": True, "use_last_layernorm": True},
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


_encoded = {}


def encode_corpora(tok, root):
    """{name: (training tokens, held-out tokens)} of every corpus file (memoised for ab.py)."""
    if (id(tok), root) not in _encoded:
        enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        _encoded[(id(tok), root)] = {name: (enc(t), enc(h)) for name, (t, h) in load_corpora(root).items()}
    return _encoded[(id(tok), root)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True)
    p.add_argument("--corpora", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=0, help="stop training after this long (0 = no limit)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ttt", type=int, default=3, help="training-time-test steps unrolled")
    p.add_argument("--draft-vocab", type=int, default=16384)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--fusion", default="", help="target layers whose INPUT is fused (default 2, L/2, L-3)")
    p.add_argument("--self-distill", type=int, default=256, help="prompts answered by the target")
    p.add_argument("--gen-tokens", type=int, default=384)
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--distill-share", type=float, default=0.25, help="share of windows from the target's answers")
    p.add_argument("--distill-cache", default="", help="JSON of the target's answers: read if it exists, else written")
    # Attention distillation of the retrieval head (attn.py): KL(P || Q) per sampled query and KV head.
    p.add_argument("--attn-distill", type=float, default=0.0, help="weight of the attention loss (0: off)")
    p.add_argument("--attn-agg", choices=("mean", "max"), default="max",
                   help="how the target's attention is combined over layers and a group's query heads")
    p.add_argument("--attn-loss", choices=("kl", "topk"), default="kl")
    p.add_argument("--attn-topk", type=int, default=256, help="positions kept of P by --attn-loss topk")
    p.add_argument("--attn-queries", type=int, default=128, help="query positions sampled per window")
    p.add_argument("--attn-sink", type=int, default=1, help="first positions always selected (left out of the loss)")
    # Attention recall on held-out windows (attn.recall_eval).
    p.add_argument("--recall-budgets", default="128,256,512,1024,2048")
    p.add_argument("--recall-seq-len", type=int, default=0, help="window length of the final recall (0: --seq-len)")
    p.add_argument("--recall-windows", type=int, default=8)
    p.add_argument("--recall-queries", type=int, default=256, help="uniform query positions per window")
    p.add_argument("--recall-yarn", default="auto",
                   help="final recall's RoPE: auto = YaRN from --seq-len to the target's context as "
                        "`specontext prune --yarn-factor auto` stretches it; none; or a factor")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    start = time.time()
    os.makedirs(a.out, exist_ok=True)

    tok, target = load_target(a.gguf, a.device)
    tc = target.config
    L = tc.num_hidden_layers
    fusion = [int(x) for x in a.fusion.split(",")] if a.fusion else [2, L // 2, L - 3]
    c = {"hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
         "num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
         "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
         "rms_norm_eps": tc.rms_norm_eps, "rope_theta": a.rope_theta, "vocab_size": tc.vocab_size}
    log(f"target: {L} layers, hidden {tc.hidden_size}; fusion (layer inputs) {fusion}")

    corpora = load_corpora(a.corpora)
    encoded = encode_corpora(tok, a.corpora)
    train_streams = [encoded[name][0] for name in corpora]
    held_streams = [encoded[name][1] for name in corpora]
    stats = {"corpora": {name: {"train_tokens": len(s), "held_out_tokens": len(h)}
                         for name, s, h in zip(corpora, train_streams, held_streams)}}
    log(f"corpora: {sum(map(len, train_streams))} training tokens, {sum(map(len, held_streams))} held out")

    prompts = make_prompts([t for t, _ in corpora.values()], a.self_distill, random.Random(a.seed + 1))
    if a.distill_cache and os.path.exists(a.distill_cache):
        with open(a.distill_cache) as f:
            answers = json.load(f)
    else:
        answers = self_distill(tok, target, prompts, a.gen_tokens, a.gen_batch, a.device, a.seed) if prompts else []
        if a.distill_cache:
            with open(a.distill_cache, "w") as f:
                json.dump(answers, f)
    distill_stream = [t for seq in answers for t in seq + [tok.eos_token_id]]
    stats["self_distill"] = {"prompts": len(prompts), "tokens": len(distill_stream)}
    log(f"self-distillation: {len(answers)} answers, {len(distill_stream)} tokens ({time.time() - start:.0f} s)")

    # After generation (which keeps plain sdpa): records the target's rotated q/k for attention recall and
    # distillation; outside a capture it is sdpa.
    cap = TargetCapture(target)
    budgets = [int(b) for b in a.recall_budgets.split(",")]
    recall_len = a.recall_seq_len or a.seq_len
    yarn = None
    if a.recall_yarn == "auto":
        factor = tc.max_position_embeddings / a.seq_len
        yarn = (factor, a.seq_len) if factor > 1 else None
    elif a.recall_yarn != "none":
        yarn = (float(a.recall_yarn), a.seq_len)
    # Fixed held-out windows (same for every run at one length), so that recalls compare across runs.
    probe_windows = Windows(held_streams, a.seq_len, 777).sample(2)
    final_windows = Windows(held_streams, recall_len, 778).sample(a.recall_windows)

    draft_ids = draft_vocabulary(train_streams + [distill_stream], a.draft_vocab, tc.vocab_size)
    draft = Eagle3Draft(c, draft_ids).to(a.device)
    init_weights(draft)
    opt = torch.optim.AdamW(draft.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    corpus_windows = Windows(train_streams, a.seq_len + 1, a.seed + 2)
    distill_windows = Windows([distill_stream], a.seq_len + 1, a.seed + 3) if len(distill_stream) > a.seq_len + 2 else None
    held_windows = Windows(held_streams, a.seq_len + 1, 12345)
    log_path = open(os.path.join(a.out, "train_log.jsonl"), "w")
    n_distill = int(round(a.batch * a.distill_share)) if distill_windows else 0
    t_train = time.time()
    step = 0
    for step in range(a.steps):
        if a.minutes and time.time() - t_train > 60 * a.minutes:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a)
        tokens = corpus_windows.sample(a.batch - n_distill) + (distill_windows.sample(n_distill) if n_distill else [])
        losses, agree, attn_terms = run_batch(tokens, target, draft, fusion, a, cap if a.attn_distill > 0 else None)
        loss = sum(0.8 ** k * l for k, l in enumerate(losses))
        if attn_terms is not None:
            loss = loss + a.attn_distill * attn_terms[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 0.5)
        opt.step()
        rec = {"step": step, "loss": loss.item(), "lr": lr_at(step, a), "seconds": round(time.time() - start, 1),
               "loss_k": [round(float(x.detach()), 4) for x in losses], "top1_k": [round(float(x), 4) for x in agree]}
        if attn_terms is not None:
            rec["attn_loss"], rec["attn_kl"] = round(float(attn_terms[0].detach()), 4), round(float(attn_terms[1]), 4)
        if step % a.eval_every == 0 or step == a.steps - 1:
            rec["held_out_top1_k"] = [round(x, 4) for x in evaluate(held_windows, target, draft, fusion, a, 2)]
            r = recall_eval(target, cap, draft, fusion, probe_windows, 128, budgets, a.attn_sink, None, seed=1)
            rec["held_out_recall_head"] = r["mean"]["head"]
            log(json.dumps(rec))
        log_path.write(json.dumps(rec) + "\n")
    steps_done = step + 1
    train_s = time.time() - t_train
    held = evaluate(held_windows, target, draft, fusion, a, a.eval_batches)
    log(f"held-out top-1 agreement per TTT step: {held}")
    t_recall = time.time()
    recall = recall_eval(target, cap, draft, fusion, final_windows, a.recall_queries, budgets, a.attn_sink, yarn, seed=2)
    recall["seconds"] = round(time.time() - t_recall, 1)
    with open(os.path.join(a.out, "recall.json"), "w") as f:
        json.dump(recall, f, indent=1)
    log(f"held-out attention recall at {recall_len} (yarn {yarn}): " + json.dumps(recall["mean"]))
    save_specforge(draft, c, fusion, a, os.path.join(a.out, "draft"))
    summary = {"target": os.path.basename(a.gguf), "fusion_layer_inputs": fusion, "seq_len": a.seq_len,
               "batch": a.batch, "steps": steps_done, "tokens_seen": steps_done * a.batch * a.seq_len,
               "ttt": a.ttt, "lr": a.lr, "draft_vocab": len(draft_ids), "rope_theta": a.rope_theta,
               "train_seconds": round(train_s, 1), "wall_seconds": round(time.time() - start, 1),
               "held_out_top1_agreement_k": held, "held_out_eval_tokens": a.eval_batches * a.batch * a.seq_len,
               "attn_distill": {"weight": a.attn_distill, "agg": a.attn_agg, "loss": a.attn_loss,
                                "topk": a.attn_topk, "queries": a.attn_queries, "sink": a.attn_sink},
               "held_out_recall": {k: recall[k] for k in ("seq_len", "yarn", "queries", "mean")},
               "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
               "torch": torch.__version__, **stats}
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"done: {steps_done} steps in {train_s:.0f} s; draft in {a.out}/draft")


if __name__ == "__main__":
    main()

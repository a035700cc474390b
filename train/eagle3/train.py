#!/usr/bin/env python3
"""Trains an EAGLE-3 draft for a target model given as a GGUF file (SmolLM2-135M-Instruct here) and writes it
in SpecForge's published layout (config.json with eagle_config, model.safetensors with d2t/t2d), ready for
`specontext prune --kind eagle3`. Runs on the GPU machine in one call; see README.md for the recipe.

  python3 train/eagle3/train.py --gguf M.gguf --corpora ../shared/corpora --out OUT --seq-len 2048 --steps 1500
"""
import argparse
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
from data import Windows, load_corpora, make_prompts  # noqa: E402
from draft import Eagle3Draft, init_weights  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_target(gguf, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.bfloat16).to(device).eval()
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
        counts += torch.bincount(torch.as_tensor(s), minlength=vocab)
    return sorted(torch.argsort(counts, descending=True)[:size].tolist())


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    frac = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def run_batch(tokens, target, draft, fusion, a):
    """Draft losses and top-1 agreements per training-time-test step on one batch of token windows."""
    ids = torch.as_tensor(tokens, device=a.device)
    with torch.no_grad():
        out = target(ids, output_hidden_states=True)
        g = torch.cat([out.hidden_states[f] for f in fusion], dim=-1)           # [B, T, 3H]
        tlogits = out.logits[:, 1:]                                              # predicts x_{t+1}
        p = torch.softmax(tlogits[..., draft.draft_ids].float(), dim=-1)         # over the draft vocabulary
        full_argmax = tlogits.argmax(-1)
        emb = target.get_input_embeddings()(ids[:, 1:])
    T = ids.shape[1] - 1
    cos, sin = draft.rope(T, ids.device)
    with torch.autocast("cuda" if ids.is_cuda else "cpu", dtype=torch.bfloat16, enabled=a.bf16):
        h_in = draft.fc(g[:, :-1])
        losses, agree = [], []
        for k in range(a.ttt):
            h_out, logits = draft.step(emb, h_in, cos, sin)
            logp = F.log_softmax(logits.float(), dim=-1)
            losses.append(-(p * logp).sum(-1).mean())
            agree.append((draft.draft_ids[logits.argmax(-1)] == full_argmax).float().mean())
            # Training-time test: the next step reads the draft's own hidden state of the previous position
            # where step 0 read the target's features, as drafting several tokens ahead does.
            h_in = torch.cat([torch.zeros_like(h_out[:, :1]), h_out[:, :-1]], dim=1)
    return losses, agree


@torch.no_grad()
def evaluate(windows, target, draft, fusion, a, batches):
    draft.eval()
    tot = [0.0] * a.ttt
    for _ in range(batches):
        _, agree = run_batch(windows.sample(a.batch), target, draft, fusion, a)
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


def main():
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
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
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
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    train_streams = [enc(t) for t, _ in corpora.values()]
    held_streams = [enc(h) for _, h in corpora.values()]
    stats = {"corpora": {name: {"train_tokens": len(s), "held_out_tokens": len(h)}
                         for name, s, h in zip(corpora, train_streams, held_streams)}}
    log(f"corpora: {sum(map(len, train_streams))} training tokens, {sum(map(len, held_streams))} held out")

    prompts = make_prompts([t for t, _ in corpora.values()], a.self_distill, random.Random(a.seed + 1))
    answers = self_distill(tok, target, prompts, a.gen_tokens, a.gen_batch, a.device, a.seed) if prompts else []
    distill_stream = [t for seq in answers for t in seq + [tok.eos_token_id]]
    stats["self_distill"] = {"prompts": len(prompts), "tokens": len(distill_stream)}
    log(f"self-distillation: {len(answers)} answers, {len(distill_stream)} tokens ({time.time() - start:.0f} s)")

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
        losses, agree = run_batch(tokens, target, draft, fusion, a)
        loss = sum(0.8 ** k * l for k, l in enumerate(losses))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 0.5)
        opt.step()
        rec = {"step": step, "loss": loss.item(), "lr": lr_at(step, a), "seconds": round(time.time() - start, 1),
               "loss_k": [round(float(x), 4) for x in losses], "top1_k": [round(float(x), 4) for x in agree]}
        if step % a.eval_every == 0 or step == a.steps - 1:
            rec["held_out_top1_k"] = [round(x, 4) for x in evaluate(held_windows, target, draft, fusion, a, 2)]
            log(json.dumps(rec))
        log_path.write(json.dumps(rec) + "\n")
    steps_done = step + 1
    train_s = time.time() - t_train
    held = evaluate(held_windows, target, draft, fusion, a, a.eval_batches)
    log(f"held-out top-1 agreement per TTT step: {held}")
    save_specforge(draft, c, fusion, a, os.path.join(a.out, "draft"))
    summary = {"target": os.path.basename(a.gguf), "fusion_layer_inputs": fusion, "seq_len": a.seq_len,
               "batch": a.batch, "steps": steps_done, "tokens_seen": steps_done * a.batch * a.seq_len,
               "ttt": a.ttt, "lr": a.lr, "draft_vocab": len(draft_ids), "rope_theta": a.rope_theta,
               "train_seconds": round(train_s, 1), "wall_seconds": round(time.time() - start, 1),
               "held_out_top1_agreement_k": held, "held_out_eval_tokens": a.eval_batches * a.batch * a.seq_len,
               "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
               "torch": torch.__version__, **stats}
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"done: {steps_done} steps in {train_s:.0f} s; draft in {a.out}/draft")


if __name__ == "__main__":
    main()

"""Attention distillation and attention recall for the retrieval head pruned from the EAGLE-3 draft.

How the engine uses the head (core/sparse/retrieval_head.h, selection.h): at target position t it reads the
token x_t and the target's fused features of position t-1 (zeros at t = 0), with RoPE at t, and computes
q_t (query heads) and k_t (KV heads) through the draft's fc, input_layernorm, hidden_norm, q_proj and k_proj.
The past s < t is scored per query head h by softmax_s(q_h,t . k_g,s / sqrt(d)); the query heads of KV group
g are combined by element-wise max; the top-B positions per KV head (the first `sink` always) are the only
past tokens that every layer of the target attends to at that step.

What matters is therefore how much of the target's attention mass, at each layer and query head, lies in
that set: the recall, measured here on held-out windows. Training for it: the head's distribution Q over the
past, built exactly as selection ranks positions, is pulled towards the target's attention P over the past,
aggregated over layers and the group's query heads (KL(P || Q)).

The target's rotated q/k are what HF's LlamaAttention hands its attention function; a registered attention
function records k and only the sampled query rows of q, then runs sdpa, so nothing [T, T] is materialised
by the model; the probabilities of the sampled rows are computed here, one layer at a time.
"""
import contextlib
import math

import torch

from draft import apply_rope

# A finite "minus infinity": masked logits get zero probability, and a row without any allowed entry stays
# finite (uniform) instead of NaN, so masked_fill never poisons gradients.
NEG = -1e9


class TargetCapture:
    """Records, per layer of a HF Llama-type model, the rotated K [B, kv, T, d] and the rotated Q of chosen
    query positions [B, heads, n, d] during forwards run inside `capture(idx)`; other forwards just run sdpa."""

    NAME = "spc_capture"

    def __init__(self, model):
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        self.idx, self.q, self.k, self.scaling, self.groups = None, {}, {}, None, None

        def attention(module, query, key, value, attention_mask, **kwargs):
            if self.idx is not None:
                B, H, _, d = query.shape
                self.q[module.layer_idx] = query.gather(2, self.idx[:, None, :, None].expand(B, H, -1, d))
                self.k[module.layer_idx] = key
                self.scaling = kwargs.get("scaling") or module.scaling
                self.groups = module.num_key_value_groups
            return sdpa(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.NAME, attention)
        # The masks (padding in generate) stay sdpa's.
        AttentionMaskInterface.register(self.NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        model.set_attn_implementation(self.NAME)

    @contextlib.contextmanager
    def capture(self, idx):
        """Records during the block when idx [B, n] (query positions) is given; the records stay until clear()."""
        self.clear()
        self.idx = idx
        try:
            yield self
        finally:
            self.idx = None

    def clear(self):
        self.q, self.k = {}, {}

    def layers(self):
        return sorted(self.k)


def past_mask(idx, T, lo=0):
    """[B, 1, n, T]: True where lo <= s < t (t = the query position idx)."""
    s = torch.arange(T, device=idx.device)
    return (s[None, None, None, :] < idx[:, None, :, None]) & (s >= lo)


def sample_queries(batch, T, n, lo, device, generator=None, late=True):
    """[batch, n] distinct sorted query positions in [lo, T); with `late`, drawn with probability proportional
    to the position (long pasts are where small budgets lose mass, and there are more of them at decode)."""
    n = min(n, T - lo)
    w = torch.arange(lo, T, dtype=torch.float32) if late else torch.ones(T - lo)
    idx = torch.multinomial(w.expand(batch, -1), n, replacement=False, generator=generator) + lo
    return idx.sort(-1).values.to(device)


def target_layer_probs(cap, layer, idx):
    """The target's softmax attention of layer `layer` for the captured query rows, over the past s < t only
    (renormalised: the current token is always attended and is not part of selection): [B, G, gr, n, T]."""
    q, k = cap.q[layer].float(), cap.k[layer].float()
    B, H, n, d = q.shape
    G, T = k.shape[1], k.shape[2]
    # HF's GQA: query head h reads KV head h // groups, so [B, G, gr] is a view of the H query heads.
    s = torch.matmul(q.view(B, G, H // G, n, d), k[:, :, None].transpose(-1, -2)) * cap.scaling
    return torch.softmax(s.masked_fill(~past_mask(idx, T)[:, :, None], NEG), -1)


@torch.no_grad()
def target_distribution(cap, idx, agg="mean"):
    """P [B, G, n, T]: the target's past attention aggregated over all layers and the group's query heads.
    mean: the average (the set maximising mean recall over layers and heads is exactly its top-B);
    max: the element-wise max (favours tokens any single head needs), renormalised."""
    acc = None
    for layer in cap.layers():
        p = target_layer_probs(cap, layer, idx)
        p = p.mean(2) if agg == "mean" else p.amax(2)
        acc = p if acc is None else (acc + p if agg == "mean" else torch.maximum(acc, p))
    return acc / acc.sum(-1, keepdim=True).clamp_min(1e-30)


def head_qk(draft, emb, h, idx, cos, sin):
    """The head's rotated q at the query positions idx [B, n] -> [B, heads, n, d] and k at every position
    [B, kv, T, d]. emb [B, T, H]: embeddings of x_0..x_{T-1}; h [B, T, H]: fc of the target's features of
    position t-1 (zeros at t = 0, as the engine feeds the first token); cos/sin [T, d] at positions 0..T-1."""
    attn = draft.midlayer.self_attn
    x = draft.midlayer.inputs(emb, h)
    B, T, W = x.shape
    d = attn.head_dim
    k = apply_rope(attn.k_proj(x).view(B, T, attn.kv_heads, d).transpose(1, 2), cos, sin)
    xs = x.gather(1, idx[..., None].expand(B, idx.shape[1], W))
    q = attn.q_proj(xs).view(B, -1, attn.heads, d).transpose(1, 2)
    return apply_rope(q, cos[idx][:, None], sin[idx][:, None]), k


def head_group_logits(q, k, idx):
    """[B, G, n, T]: log of selection's ranking weights, max over the group's query heads of
    softmax_{s<t}(q.k / sqrt(d)); NEG outside the past. softmax over s of it is the head's Q."""
    B, H, n, d = q.shape
    G, T = k.shape[1], k.shape[2]
    s = torch.matmul(q.float().view(B, G, H // G, n, d), k.float()[:, :, None].transpose(-1, -2)) / math.sqrt(d)
    logp = torch.log_softmax(s.masked_fill(~past_mask(idx, T)[:, :, None], NEG), -1)
    return logp.amax(2).masked_fill(~past_mask(idx, T), NEG)


def distill_loss(P, z, idx, sink=1, kind="kl", topk=256):
    """Attention distillation loss and KL(P || Q) (for the log), both averaged over sequences, KV heads and
    query rows. Both distributions are restricted to sink <= s < t and renormalised: the sink positions are
    always selected, so their (often large) mass carries no ranking signal.
    kind kl: cross-entropy of Q under P (= KL up to P's entropy).
    kind topk: cross-entropy under P cut to its `topk` largest positions, focusing on the selected set."""
    keep = past_mask(idx, P.shape[-1], lo=sink)
    P = P.masked_fill(~keep, 0)
    P = P / P.sum(-1, keepdim=True).clamp_min(1e-30)
    logq = torch.log_softmax(z.masked_fill(~keep, NEG), -1)
    with torch.no_grad():
        kl = (P * (P.clamp_min(1e-30).log() - logq)).sum(-1).mean()
    if kind == "topk":
        vals, ind = P.topk(min(topk, P.shape[-1]), dim=-1)
        P = torch.zeros_like(P).scatter_(-1, ind, vals)
        P = P / P.sum(-1, keepdim=True).clamp_min(1e-30)
    elif kind != "kl":
        raise ValueError(f"unknown attention loss {kind}")
    return -(P * logq).sum(-1).mean(), kl


def _with_sink(score, idx, sink):
    """Selection keeps the first `sink` past positions whatever their score."""
    s = torch.arange(score.shape[-1], device=score.device)
    forced = (s[None, None, None, :] < sink) & (s[None, None, None, :] < idx[:, None, :, None])
    return score.masked_fill(forced, -NEG)


def _captured(p, order, budgets):
    """p [B, G, gr, n, T] probabilities, order [B, G, n, k] positions best first -> [B, G, gr, n, len(budgets)]:
    the mass in the first B positions of the order."""
    k = order.shape[-1]
    cs = p.gather(-1, order[:, :, None].expand(*p.shape[:-1], k)).cumsum(-1)
    return torch.stack([cs[..., min(b, k) - 1] for b in budgets], -1)


def bucket_label(t, edges):
    lo = 0
    for e in edges:
        if t <= e:
            return f"{lo + 1}-{e}"
        lo = e
    return f">{lo}"


@torch.no_grad()
def recall_eval(target, cap, draft, fusion, windows, n_queries, budgets, sink=1, yarn=None, seed=0):
    """Attention recall on `windows` (token lists of one length L), n_queries uniform query positions each.

    For each query t, target layer l and query head h, recall = the part of the target's softmax mass over the
    past s < t that lies in a set of B past positions for h's KV head. Sets:
      head           the retrieval head's top-B (selection's rule, first `sink` always kept)
      window         the first `sink` and the most recent B - sink
      oracle         per layer and KV head, the B largest of the group's mean mass (the best per-layer set)
      shared_oracle  per KV head, the B largest of the mean over layers and group heads (the best single set
                     for all layers, which is what a head can at most reach)
    Averaged over layers, query heads and queries; also per bucket of t and per layer (head only)."""
    device = next(draft.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    budgets = sorted(budgets)
    L = len(windows[0])
    kmax = min(max(budgets), L)
    d = draft.c["head_dim"]
    cos, sin = draft.rope(L, device, yarn)
    methods = ("head", "window", "oracle", "shared_oracle")
    per_t = {m: [] for m in methods}
    ts, by_layer = [], None
    was_training = draft.training
    draft.eval()
    for w in windows:
        ids = torch.as_tensor([w], device=device)
        idx = sample_queries(1, L, n_queries, 1, device, gen, late=False)
        with cap.capture(idx):
            out = target(ids, output_hidden_states=True)
        g = torch.cat([out.hidden_states[f] for f in fusion], dim=-1).float()
        emb = target.get_input_embeddings()(ids).float()
        with torch.autocast(device.type, enabled=False):
            h = draft.fc(g)
            h = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)   # position t reads features of t-1
            q, k = head_qk(draft, emb, h, idx, cos, sin)
            z = head_group_logits(q, k, idx)
        order = {"head": _with_sink(z, idx, sink).topk(kmax, -1).indices}
        pos = torch.arange(L, device=device, dtype=torch.float32).expand_as(z)
        recent = pos.masked_fill(~past_mask(idx, L), NEG)
        order["window"] = _with_sink(recent, idx, sink).topk(kmax, -1).indices
        acc = {m: 0.0 for m in methods}
        layer_rec, p_mean = [], 0.0
        layers = cap.layers()
        for layer in layers:
            p = target_layer_probs(cap, layer, idx)
            pm = p.mean(2)
            p_mean = p_mean + pm
            order["oracle"] = pm.topk(kmax, -1).indices
            for m in ("head", "window", "oracle"):
                r = _captured(p, order[m], budgets).mean((1, 2))[0]        # [n, nb]
                acc[m] = acc[m] + r
                if m == "head":
                    layer_rec.append(r.mean(0))
        order["shared_oracle"] = p_mean.topk(kmax, -1).indices
        for layer in layers:
            acc["shared_oracle"] = acc["shared_oracle"] + _captured(
                target_layer_probs(cap, layer, idx), order["shared_oracle"], budgets).mean((1, 2))[0]
        cap.clear()
        for m in methods:
            per_t[m].append(acc[m].cpu() / len(layers))
        ts.append(idx[0].cpu())
        lr = torch.stack(layer_rec).cpu()
        by_layer = lr if by_layer is None else by_layer + lr
    draft.train(was_training)

    t = torch.cat(ts)
    rec = {m: torch.cat(v) for m, v in per_t.items()}                      # [N, nb]
    edges = [e for e in (256, 512, 1024, 2048, 4096, 8192, 16384) if e < L] + [L]
    labels = [bucket_label(int(x), edges) for x in t]
    as_dict = lambda r: {str(b): round(float(v), 4) for b, v in zip(budgets, r)}  # noqa: E731
    result = {"seq_len": L, "windows": len(windows), "queries": int(t.numel()), "sink": sink,
              "yarn": list(yarn) if yarn else None, "budgets": budgets,
              "mean": {m: as_dict(rec[m].mean(0)) for m in methods}, "buckets": {}}
    for lab in dict.fromkeys(labels):
        sel = torch.tensor([x == lab for x in labels])
        result["buckets"][lab] = {"queries": int(sel.sum()), **{m: as_dict(rec[m][sel].mean(0)) for m in methods}}
    result["head_by_layer"] = {str(layer): as_dict(r) for layer, r in zip(layers, by_layer / len(windows))}
    return result

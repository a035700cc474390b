"""The EAGLE-3 draft model: fused target features -> fc -> one decoder layer -> norm -> LM head over a draft
vocabulary (EAGLE-3, arXiv 2503.01840). Tensor names follow the published drafts (SafeAILab EAGLE-3 and
SpecForge: fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t, t2d), so `specontext prune --kind eagle3`
reads what this writes exactly as it reads a downloaded draft.

At position t the draft sees the token x_t (the target's frozen embedding) and the target's fused hidden
states of position t-1 (three layers, concatenated), and predicts x_{t+1}:
    h   = fc(g_{t-1})                                      [B, T, H]
    x   = cat(input_layernorm(emb(x_t)), hidden_norm(h))    [B, T, 2H]   (q/k/v read 2H)
    h  += o_proj(attention(q, k, v))                       (causal, RoPE, GQA)
    h  += mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))                              [B, T, draft_vocab]
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def yarn_inv_freq(inv_freq, head_dim, theta, factor, original, beta_fast=32.0, beta_slow=1.0):
    """YaRN (arXiv 2309.00071) as HF's _compute_yarn_parameters and the engine's rope_frequencies.cc compute
    it: dimensions rotating fast extrapolate, slow ones interpolate by `factor`, a linear ramp between.
    Returns (inv_freq, attention_scaling); the scaling multiplies cos and sin, so q.k grows by its square."""
    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low = max(0.0, math.floor(correction_dim(beta_fast)))
    high = min(head_dim - 1.0, math.ceil(correction_dim(beta_slow)))
    if low == high:
        high += 0.001
    j = torch.arange(inv_freq.shape[0], device=inv_freq.device, dtype=torch.float64)
    extrapolation = 1.0 - ((j - low) / (high - low)).clamp(0, 1)
    inv = inv_freq.double() / factor * (1 - extrapolation) + inv_freq.double() * extrapolation
    return inv.float(), 0.1 * math.log(factor) + 1.0


def rope_cos_sin(positions, head_dim, theta, device, yarn=None):
    """cos, sin [T, hd] for `positions`; yarn = (factor, original_max_positions) stretches them as
    `specontext prune --yarn-factor` does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    scaling = 1.0
    if yarn:
        inv_freq, scaling = yarn_inv_freq(inv_freq, head_dim, theta, *yarn)
    ang = positions.float()[:, None] * inv_freq[None, :]          # [T, hd/2]
    ang = torch.cat([ang, ang], dim=-1)                             # rotate-half layout (HF)
    return ang.cos() * scaling, ang.sin() * scaling


def apply_rope(x, cos, sin):  # x [B, heads, T, hd]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        h2 = 2 * c["hidden_size"]
        self.q_proj = nn.Linear(h2, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h2, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h2, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c["hidden_size"], bias=False)

    def qk(self, x, cos, sin):
        """Rotated q [B, heads, T, hd] and k [B, kv_heads, T, hd]: what the retrieval head keeps."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k = self.qk(x, cos, sin)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MidLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, eps = c["hidden_size"], c["rms_norm_eps"]
        self.hidden_norm = RMSNorm(H, eps)
        self.input_layernorm = RMSNorm(H, eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(H, c["intermediate_size"], bias=False)
        self.mlp.up_proj = nn.Linear(H, c["intermediate_size"], bias=False)
        self.mlp.down_proj = nn.Linear(c["intermediate_size"], H, bias=False)

    def inputs(self, emb, h):
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)

    def forward(self, emb, h, cos, sin):
        h = h + self.self_attn(self.inputs(emb, h), cos, sin)
        m = self.post_attention_layernorm(h)
        return h + self.mlp.down_proj(F.silu(self.mlp.gate_proj(m)) * self.mlp.up_proj(m))


class Eagle3Draft(nn.Module):
    def __init__(self, c, draft_to_target):
        super().__init__()
        self.c = c
        H = c["hidden_size"]
        self.fc = nn.Linear(3 * H, H, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(H, c["rms_norm_eps"])
        self.lm_head = nn.Linear(H, len(draft_to_target), bias=False)
        ids = torch.as_tensor(draft_to_target, dtype=torch.long)
        # Published layout: d2t[i] = target id of draft id i, minus i; t2d[v] = v is in the draft vocabulary.
        self.register_buffer("d2t", ids - torch.arange(len(ids)), persistent=True)
        t2d = torch.zeros(c["vocab_size"], dtype=torch.bool)
        t2d[ids] = True
        self.register_buffer("t2d", t2d, persistent=True)
        self.register_buffer("draft_ids", ids, persistent=False)

    def rope(self, T, device, yarn=None):
        return rope_cos_sin(torch.arange(T, device=device), self.c["head_dim"], self.c["rope_theta"], device, yarn)

    def step(self, emb, h, cos, sin):
        """One pass of the decoder layer: new hidden [B, T, H] and draft logits [B, T, draft_vocab]."""
        h = self.midlayer(emb, h, cos, sin)
        return h, self.lm_head(self.norm(h))


def init_weights(model, std=0.02):
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=std / math.sqrt(2) if "o_proj" in name or "down_proj" in name else std)

#!/usr/bin/env python3
"""CPU checks of attn.py on a tiny random Llama (seconds; no model file needed):

  python3 train/eagle3/test_attn.py

- the captured q/k give the same past attention as HF's eager attention with output_attentions;
- the head's top-B sets are selection.h's (softmax per query head, max over the group, sink kept);
- head_qk is the draft's own q/k at the engine's positions;
- recall: every set holds all mass when B >= past; oracle >= shared_oracle >= head; oracle >= window;
- the distillation losses are finite, KL >= 0, and a few steps on one batch lower the KL;
- YaRN frequencies are HF's.
"""
import math
import os
import sys
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn import (TargetCapture, _with_sink, distill_loss, head_group_logits, head_qk,  # noqa: E402
                  past_mask, recall_eval, sample_queries, target_distribution, target_layer_probs)
from draft import Eagle3Draft, init_weights, rope_cos_sin, yarn_inv_freq  # noqa: E402

H, HEADS, KV, HD, LAYERS, VOCAB = 96, 6, 2, 16, 4, 128


def tiny_target():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=192, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD, max_position_embeddings=512,
                    rope_theta=10000.0, attn_implementation="eager")
    m = LlamaForCausalLM(c).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def tiny_draft():
    c = {"hidden_size": H, "intermediate_size": 192, "num_attention_heads": HEADS, "num_key_value_heads": KV,
         "head_dim": HD, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": VOCAB}
    torch.manual_seed(1)
    d = Eagle3Draft(c, list(range(0, VOCAB, 2)))
    init_weights(d, std=0.2)  # larger than training's init so that the random head's scores are not flat
    return d


class AttnTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.target = tiny_target()
        cls.ids = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(2))
        out = cls.target(cls.ids, output_attentions=True)
        cls.eager = out.attentions                        # per layer [B, heads, T, T]
        cls.eager_logits = out.logits
        cls.cap = TargetCapture(cls.target)
        cls.fusion = [1, 2, 3]

    def test_capture_matches_eager(self):
        idx = sample_queries(2, 200, 40, 1, "cpu", torch.Generator().manual_seed(3))
        with self.cap.capture(idx):
            out = self.target(self.ids)
        self.assertEqual(self.cap.layers(), list(range(LAYERS)))
        for layer in self.cap.layers():
            p = target_layer_probs(self.cap, layer, idx).flatten(1, 2)          # [B, heads, n, T]
            ref = self.eager[layer].gather(2, idx[:, None, :, None].expand(2, HEADS, -1, 200))
            ref = ref * past_mask(idx, 200)
            ref = ref / ref.sum(-1, keepdim=True)
            torch.testing.assert_close(p, ref, atol=2e-5, rtol=1e-4)
        P = target_distribution(self.cap, idx, "mean")
        torch.testing.assert_close(P.sum(-1), torch.ones(2, KV, idx.shape[1]))
        self.cap.clear()
        # The sdpa that runs inside the capture computes the same logits as eager did.
        torch.testing.assert_close(out.logits, self.eager_logits, atol=1e-5, rtol=1e-4)

    def test_generate_with_capture_installed(self):
        # Left-padded batched generation (self-distillation) still masks padding through the capture.
        ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        got = self.target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
        alone = self.target.generate(input_ids=ids[:1, 2:], max_new_tokens=6, do_sample=False, pad_token_id=0)
        self.assertEqual(got[0, 5:].tolist(), alone[0, 3:].tolist())

    def test_head_sets_are_selection(self):
        draft = tiny_draft()
        T, B_, sink = 150, 32, 1
        ids = self.ids[:1, :T]
        emb = self.target.get_input_embeddings()(ids)
        h = torch.randn(1, T, H)
        idx = torch.tensor([[5, 31, 32, 33, 90, 149]])
        cos, sin = draft.rope(T, "cpu")
        q, k = head_qk(draft, emb, h, idx, cos, sin)
        # head_qk is the draft attention's own q/k at positions 0..T-1.
        q_all, k_all = draft.midlayer.self_attn.qk(draft.midlayer.inputs(emb, h), cos, sin)
        torch.testing.assert_close(k, k_all)
        torch.testing.assert_close(q, q_all[:, :, idx[0]])
        order = _with_sink(head_group_logits(q, k, idx), idx, sink).topk(B_, -1).indices
        for j, t in enumerate(idx[0].tolist()):
            for g in range(KV):
                # selection.h: per query head softmax over the past, max over the group, top-B, sink kept
                w = torch.stack([torch.softmax(q[0, hh, j] @ k[0, g, :t].T / math.sqrt(HD), -1)
                                 for hh in range(g * HEADS // KV, (g + 1) * HEADS // KV)]).amax(0)
                want = set(range(min(sink, t)))
                for s in sorted(range(t), key=lambda s: (-float(w[s].detach()), s)):
                    if len(want) >= min(B_, t):
                        break
                    want.add(s)
                got = set(order[0, g, j, :min(B_, t)].tolist())
                self.assertEqual(got, want, (t, g))

    def test_recall_is_sane(self):
        draft = tiny_draft()
        windows = [w.tolist() for w in self.ids[:, :160]]
        budgets = [1, 8, 32, 64, 160]
        r = recall_eval(self.target, self.cap, draft, self.fusion, windows, 100, budgets, sink=1, seed=4)
        self.assertEqual(r["queries"], 200)
        m = r["mean"]
        for meth in m:
            self.assertAlmostEqual(m[meth]["160"], 1.0, places=4)              # B >= past: everything kept
            self.assertTrue(all(0 <= v <= 1.0001 for v in m[meth].values()))
        for b in map(str, budgets):
            self.assertGreaterEqual(m["oracle"][b] + 1e-4, m["shared_oracle"][b])
            self.assertGreaterEqual(m["shared_oracle"][b] + 1e-4, m["head"][b])
            self.assertGreaterEqual(m["oracle"][b] + 1e-4, m["window"][b])
        # Queries whose past fits the budget are exact for every set.
        for lab, bk in r["buckets"].items():
            hi = int(lab.split("-")[-1].lstrip(">"))
            for b in budgets:
                if hi <= b:
                    for meth in ("head", "window", "oracle", "shared_oracle"):
                        self.assertAlmostEqual(bk[meth][str(b)], 1.0, places=4)
        self.assertEqual(len(r["head_by_layer"]), LAYERS)

    def test_distill_loss_trains(self):
        draft = tiny_draft()
        T = 200
        idx = sample_queries(2, T, 32, 2, "cpu", torch.Generator().manual_seed(5))
        with torch.no_grad(), self.cap.capture(idx):
            out = self.target(self.ids, output_hidden_states=True)
        g = torch.cat([out.hidden_states[f] for f in self.fusion], -1)
        emb = self.target.get_input_embeddings()(self.ids)
        for agg in ("mean", "max"):
            P = target_distribution(self.cap, idx, agg)
            self.assertTrue(torch.isfinite(P).all())
        P = target_distribution(self.cap, idx, "mean")
        cos, sin = draft.rope(T, "cpu")
        params = [draft.fc.weight, draft.midlayer.self_attn.q_proj.weight, draft.midlayer.self_attn.k_proj.weight]
        opt = torch.optim.Adam(params, lr=3e-3)
        kls = []
        for step in range(30):
            h = draft.fc(g)
            h = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
            q, k = head_qk(draft, emb, h, idx, cos, sin)
            z = head_group_logits(q, k, idx)
            loss, kl = distill_loss(P, z, idx, sink=1, kind="kl")
            loss_top, _ = distill_loss(P, z, idx, sink=1, kind="topk", topk=16)
            self.assertTrue(torch.isfinite(loss) and torch.isfinite(loss_top))
            self.assertGreaterEqual(float(kl), -1e-5)
            kls.append(float(kl))
            opt.zero_grad()
            loss.backward()
            self.assertTrue(all(torch.isfinite(p.grad).all() for p in params))
            opt.step()
        self.cap.clear()
        self.assertLess(kls[-1], 0.8 * kls[0], kls)

    def test_yarn_is_hf(self):
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        c = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64, max_position_embeddings=8192,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 2048})
        ref, scale = ROPE_INIT_FUNCTIONS["yarn"](c, "cpu")
        base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
        inv, ours = yarn_inv_freq(base, 64, 10000.0, 4.0, 2048)
        torch.testing.assert_close(inv, ref.float(), rtol=1e-6, atol=0)
        self.assertAlmostEqual(ours, scale, places=6)
        cos, _ = rope_cos_sin(torch.arange(1), 64, 10000.0, "cpu", (4.0, 2048))
        self.assertAlmostEqual(float(cos[0, 0]), 0.1 * math.log(4.0) + 1.0, places=6)


if __name__ == "__main__":
    unittest.main(verbosity=2)

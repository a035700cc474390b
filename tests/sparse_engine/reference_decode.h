// A brute-force decode step of a Llama-family f32 checkpoint written from the definitions (double
// accumulation), for the selection-source tests: given the past KV the engine wrote and, per layer
// and KV head, the set of past positions attention reads, it recomputes each layer's query, the
// recall of every query head (softmax mass over all past tokens in the set, the current token
// excluded), sparse attention over the set plus the current token, and the logits. Checks the
// current token's K row against the engine's.
#pragma once

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/backend.h"
#include "core/io/weight_source.h"
#include "core/rope/rope_frequencies.h"
#include "core/status_macros.h"

namespace specontext::testing {

struct ReferenceStep {
  std::vector<double> recall;  // [n_layers, n_heads]
  std::vector<double> logits;  // [vocab]
  double k_row_error = 0;      // max |reference K - engine K| of the current token
};

// The positions KV head g of layer l reads, given that layer's reference queries [n_heads * hd] and
// its K [n_kv, rows, hd] (a per-layer source chooses from them).
using ReferenceSets = std::function<std::vector<int32_t>(int l, int g, const std::vector<double>& q,
                                                         const Tensor& k)>;

class ReferenceDecoder {
 public:
  static absl::StatusOr<ReferenceDecoder> Create(const Checkpoint& ckpt) {
    ReferenceDecoder r;
    r.c_ = ckpt.config;
    auto get = [&](const std::string& name) -> absl::StatusOr<std::vector<double>> {
      ASSIGN_OR_RETURN(Tensor t, ckpt.weights->Get(name));
      if (t.dtype() != DType::kF32)
        return absl::InvalidArgumentError(absl::StrCat(name, " is not f32"));
      return std::vector<double>(t.as<float>(), t.as<float>() + t.numel());
    };
    ASSIGN_OR_RETURN(r.embed_, get("model.embed_tokens.weight"));
    ASSIGN_OR_RETURN(r.final_norm_, get("model.norm.weight"));
    r.lm_head_ = r.embed_;
    if (!r.c_.tie_word_embeddings) {
      ASSIGN_OR_RETURN(r.lm_head_, get("lm_head.weight"));
    }
    for (int l = 0; l < r.c_.num_hidden_layers; ++l) {
      Layer w;
      const std::string p = absl::StrCat("model.layers.", l, ".");
      ASSIGN_OR_RETURN(w.in, get(p + "input_layernorm.weight"));
      ASSIGN_OR_RETURN(w.post, get(p + "post_attention_layernorm.weight"));
      ASSIGN_OR_RETURN(w.q, get(p + "self_attn.q_proj.weight"));
      ASSIGN_OR_RETURN(w.k, get(p + "self_attn.k_proj.weight"));
      ASSIGN_OR_RETURN(w.v, get(p + "self_attn.v_proj.weight"));
      ASSIGN_OR_RETURN(w.o, get(p + "self_attn.o_proj.weight"));
      ASSIGN_OR_RETURN(w.gate, get(p + "mlp.gate_proj.weight"));
      ASSIGN_OR_RETURN(w.up, get(p + "mlp.up_proj.weight"));
      ASSIGN_OR_RETURN(w.down, get(p + "mlp.down_proj.weight"));
      r.layers_.push_back(std::move(w));
    }
    ASSIGN_OR_RETURN(RopeFrequencies f, ComputeRopeFrequencies(r.c_));
    r.inv_freq_ = f.inv_freq;
    r.rope_scale_ = f.attention_scaling;
    return r;
  }

  // Token `token` at position `past` of a sequence whose KV rows [0, past] (the current one
  // included) the engine wrote into `kv`.
  ReferenceStep Step(int32_t token, int32_t past, const SequenceKv& kv,
                     const ReferenceSets& sets) const {
    const int64_t d = c_.hidden_size, nh = c_.num_attention_heads, nkv = c_.num_key_value_heads,
                  hd = c_.head_dim;
    const int64_t group = nh / nkv, inter = c_.intermediate_size;
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    ReferenceStep out;
    std::vector<double> x(embed_.begin() + token * d, embed_.begin() + (token + 1) * d);
    for (int l = 0; l < c_.num_hidden_layers; ++l) {
      const Layer& w = layers_[l];
      const std::vector<double> h = Norm(x, w.in);
      std::vector<double> q = Mat(w.q, h, nh * hd), k = Mat(w.k, h, nkv * hd),
                          v = Mat(w.v, h, nkv * hd);
      for (int64_t j = 0; j < nh; ++j) Rope(&q[j * hd], past);
      for (int64_t g = 0; g < nkv; ++g) Rope(&k[g * hd], past);
      const Tensor &kc = kv.k[l], &vc = kv.v[l];
      const int64_t rows = kc.dim(1);
      auto K = [&](int64_t g, int64_t t, int64_t e) {
        return static_cast<double>(kc.as<float>()[(g * rows + t) * hd + e]);
      };
      auto V = [&](int64_t g, int64_t t, int64_t e) {
        return static_cast<double>(vc.as<float>()[(g * rows + t) * hd + e]);
      };
      for (int64_t g = 0; g < nkv; ++g) {
        for (int64_t e = 0; e < hd; ++e)
          out.k_row_error = std::max(out.k_row_error, std::abs(K(g, past, e) - k[g * hd + e]));
      }
      std::vector<double> attn(nh * hd, 0.0);
      for (int64_t g = 0; g < nkv; ++g) {
        const std::vector<int32_t> set = sets(l, static_cast<int>(g), q, kc);
        for (int64_t j = g * group; j < (g + 1) * group; ++j) {
          auto dot = [&](int64_t t) {
            double s = 0;
            for (int64_t e = 0; e < hd; ++e) s += q[j * hd + e] * K(g, t, e);
            return s * scale;
          };
          double mx = -INFINITY;
          std::vector<double> s(past);
          for (int64_t t = 0; t < past; ++t) mx = std::max(mx, s[t] = dot(t));
          double all = 0, in_set = 0;
          for (int64_t t = 0; t < past; ++t) all += std::exp(s[t] - mx);
          for (int32_t t : set) in_set += std::exp(s[t] - mx);
          out.recall.push_back(past > 0 ? in_set / all : 1.0);
          // Attention over the set and the current token.
          double cur = 0;
          for (int64_t e = 0; e < hd; ++e) cur += q[j * hd + e] * k[g * hd + e];
          cur *= scale;
          double m2 = cur;
          for (int32_t t : set) m2 = std::max(m2, s[t]);
          double z = std::exp(cur - m2);
          for (int64_t e = 0; e < hd; ++e) attn[j * hd + e] = z * v[g * hd + e];
          for (int32_t t : set) {
            const double p = std::exp(s[t] - m2);
            z += p;
            for (int64_t e = 0; e < hd; ++e) attn[j * hd + e] += p * V(g, t, e);
          }
          for (int64_t e = 0; e < hd; ++e) attn[j * hd + e] /= z;
        }
      }
      const std::vector<double> o = Mat(w.o, attn, d);
      for (int64_t i = 0; i < d; ++i) x[i] += o[i];
      const std::vector<double> h2 = Norm(x, w.post);
      const std::vector<double> gate = Mat(w.gate, h2, inter), up = Mat(w.up, h2, inter);
      std::vector<double> act(inter);
      for (int64_t i = 0; i < inter; ++i) act[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
      const std::vector<double> down = Mat(w.down, act, d);
      for (int64_t i = 0; i < d; ++i) x[i] += down[i];
    }
    out.logits = Mat(lm_head_, Norm(x, final_norm_), c_.vocab_size);
    return out;
  }

  const ModelConfig& config() const { return c_; }

 private:
  struct Layer {
    std::vector<double> in, post, q, k, v, o, gate, up, down;
  };
  std::vector<double> Norm(const std::vector<double>& x, const std::vector<double>& w) const {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + c_.rms_norm_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * w[i];
    return y;
  }
  // y = W x, W [m, x.size()] (HF layout).
  static std::vector<double> Mat(const std::vector<double>& w, const std::vector<double>& x,
                                 int64_t m) {
    std::vector<double> y(m, 0.0);
    const int64_t n = static_cast<int64_t>(x.size());
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) y[i] += w[i * n + j] * x[j];
    }
    return y;
  }
  void Rope(double* x, int32_t pos) const {
    const int64_t half = c_.head_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
      const double a = static_cast<double>(static_cast<float>(pos) * inv_freq_[i]);
      const double c = std::cos(a) * rope_scale_, s = std::sin(a) * rope_scale_;
      const int64_t i1 = c_.rope_interleaved ? 2 * i : i,
                    i2 = c_.rope_interleaved ? 2 * i + 1 : i + half;
      const double x1 = x[i1], x2 = x[i2];
      x[i1] = x1 * c - x2 * s;
      x[i2] = x2 * c + x1 * s;
    }
  }

  ModelConfig c_;
  std::vector<double> embed_, final_norm_, lm_head_;
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;
  double rope_scale_ = 1.0;
};

}  // namespace specontext::testing

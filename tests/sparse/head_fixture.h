// Random retrieval heads built in memory (no files) for the backend-forward tests on CPU and CUDA: `layer`
// heads (optionally with q/k biases and QK norms, as Qwen2/Qwen3 layers have) and `eagle3` heads sharing the
// target's embedding. Weights are bf16-representable f32 so that the CUDA backend sees the same numbers.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/io/weight_source.h"
#include "core/sparse/retrieval_head.h"

namespace specontext::testing_sparse {

class NamedWeights : public WeightSource {
 public:
  explicit NamedWeights(std::vector<std::pair<std::string, Tensor>> w) : w_(std::move(w)) {}
  bool Has(std::string_view n) const override {
    for (const auto& [k, t] : w_) if (k == n) return true;
    return false;
  }
  absl::StatusOr<Tensor> Get(std::string_view n) const override {
    for (const auto& [k, t] : w_) if (k == n) return t;
    return absl::NotFoundError(std::string(n));
  }
  std::vector<std::string> Names() const override {
    std::vector<std::string> r;
    for (const auto& [k, t] : w_) r.push_back(k);
    return r;
  }

 private:
  std::vector<std::pair<std::string, Tensor>> w_;
};

struct HeadShape {
  RetrievalHeadKind kind = RetrievalHeadKind::kLayer;
  int64_t hidden = 48, n_heads = 4, n_kv = 2, head_dim = 8, vocab = 97, target_layers = 8;
  bool bias = false, qk_norm = false, yarn = false;
  FusedNorm fused_norm = FusedNorm::kNone;  // eagle3: EAGLE-3.1 fc_norm / speculators norm_before_fc
  bool fc_bias = false;                     // eagle3: SGLang fc bias
};

/// A head and what it was built from (the target weights must outlive the head: its embedding is a view).
struct RandomHead {
  ModelConfig target;
  std::unique_ptr<NamedWeights> target_weights;
  std::unique_ptr<RetrievalHead> head;
};

inline Tensor Bf16Exact(std::mt19937& rng, Shape shape, float scale, float offset = 0.0f) {
  Tensor t = Tensor::HostEmpty(DType::kF32, std::move(shape));
  std::uniform_real_distribution<float> d(-scale, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = d(rng) + offset;
  Tensor b = Tensor::HostEmpty(DType::kBF16, t.shape());
  ConvertFromF32(t.as<float>(), DType::kBF16, b.data(), t.numel());
  ConvertToF32(b.data(), DType::kBF16, t.as<float>(), t.numel());
  return t;
}

/// A random head of `shape_in`; with `target` (a real model's config) the head fits that model instead
/// (vocabulary, hidden size, KV heads, head_dim and layers from it) and an eagle3 head shares
/// `target_weights`' embedding when given.
inline absl::StatusOr<RandomHead> MakeRandomHead(const HeadShape& shape_in, std::mt19937& rng,
                                                 const ModelConfig* target = nullptr,
                                                 const WeightSource* target_weights = nullptr) {
  RandomHead r;
  HeadShape s = shape_in;
  ModelConfig& m = r.target;
  if (target != nullptr) {
    m = *target;
    s.vocab = m.vocab_size;
    s.hidden = m.hidden_size;
    s.n_kv = m.num_key_value_heads;
    s.head_dim = m.head_dim;
    s.target_layers = m.num_hidden_layers;
  } else {
    m.vocab_size = s.vocab;
    m.hidden_size = s.hidden;
    m.intermediate_size = 2 * s.hidden;
    m.num_hidden_layers = s.target_layers;
    m.num_attention_heads = s.n_heads;
    m.num_key_value_heads = s.n_kv;
    m.head_dim = s.head_dim;
    m.max_position_embeddings = 8192;
    m.rms_norm_eps = 1e-5;
    m.rope_theta = 10000;
  }
  RetrievalHeadConfig c;
  c.kind = s.kind;
  c.attn = m;
  c.attn.num_hidden_layers = 1;
  c.attn.num_attention_heads = s.n_heads;
  c.attn.attention_bias = s.bias;
  c.attn.qk_norm = s.qk_norm;
  if (s.yarn) {
    c.attn.rope_scaling.type = "yarn";
    c.attn.rope_scaling.factor = 4.0;
    c.attn.rope_scaling.original_max_position_embeddings = 2048;
  }
  c.target = {"random", s.vocab, s.hidden, s.target_layers, s.n_kv, s.head_dim};
  const int64_t in = s.kind == RetrievalHeadKind::kEagle3 ? 2 * s.hidden : s.hidden, hd = s.head_dim;
  std::vector<std::pair<std::string, Tensor>> w = {
      {"input_layernorm.weight", Bf16Exact(rng, {s.hidden}, 0.2f, 1.0f)},
      {"q_proj.weight", Bf16Exact(rng, {s.n_heads * hd, in}, 0.3f)},
      {"k_proj.weight", Bf16Exact(rng, {s.n_kv * hd, in}, 0.3f)}};
  if (s.bias) {
    w.push_back({"q_proj.bias", Bf16Exact(rng, {s.n_heads * hd}, 0.5f)});
    w.push_back({"k_proj.bias", Bf16Exact(rng, {s.n_kv * hd}, 0.5f)});
  }
  if (s.qk_norm) {
    w.push_back({"q_norm.weight", Bf16Exact(rng, {hd}, 0.2f, 1.0f)});
    w.push_back({"k_norm.weight", Bf16Exact(rng, {hd}, 0.2f, 1.0f)});
  }
  Tensor embedding = Bf16Exact(rng, {s.vocab, s.hidden}, 1.0f);
  if (s.kind == RetrievalHeadKind::kEagle3) {
    c.own_embedding = false;
    c.fusion_layers = DefaultFusionLayers(s.target_layers);
    w.push_back({"fc.weight", Bf16Exact(rng, {s.hidden, 3 * s.hidden}, 0.2f)});
    w.push_back({"hidden_norm.weight", Bf16Exact(rng, {s.hidden}, 0.2f, 1.0f)});
    c.fused_norm = s.fused_norm;
    c.fc_bias = s.fc_bias;
    if (s.fused_norm != FusedNorm::kNone) w.push_back({"fc_norm.weight", Bf16Exact(rng, {3 * s.hidden}, 0.5f, 1.0f)});
    if (s.fc_bias) w.push_back({"fc.bias", Bf16Exact(rng, {s.hidden}, 0.5f)});
    if (target_weights == nullptr) {
      r.target_weights = std::make_unique<NamedWeights>(
          std::vector<std::pair<std::string, Tensor>>{{"model.embed_tokens.weight", embedding}});
    }
  } else {
    w.push_back({"embed_tokens.weight", embedding});
  }
  NamedWeights head_weights(std::move(w));
  auto head = RetrievalHead::Create(c, head_weights, m,
                                    target_weights != nullptr ? target_weights : r.target_weights.get());
  if (!head.ok()) return head.status();
  r.head = *std::move(head);
  return r;
}

}  // namespace specontext::testing_sparse
